"""The only package that imports torch: network (train/export), artifact (write), runtime
(serve)."""
