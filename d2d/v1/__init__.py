"""Generated from protos/d2d/v1 by `python -m d2d.protogen`; do not edit."""
