"""Small helpers every room uses: model folders on disk, devices and threads, YAML files.

Pure Python at import time (torch is imported inside the functions that need it), so any
package may depend on this one without slowing `import evomerge`.
"""
