"""Generated from protos/csi.proto by `make proto`. Do not edit."""
