"""The jaxlora conformance suite: checks any LoRA implementation against `specs/`, clause by
clause. See `conformance/README.md`."""
