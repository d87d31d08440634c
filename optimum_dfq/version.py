__version__ = "0.1.0"

#: Version of the on-disk quantization format (bumped on any incompatible change).
FORMAT_VERSION = 1
