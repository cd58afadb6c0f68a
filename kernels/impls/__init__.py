"""The in-tree implementations, one file each; every module here is imported in name order
and registers itself with `register_kernel`, exactly as a plugin does."""
