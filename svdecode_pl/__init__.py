"""svdecode-pl: task adaptation of language models by Steering Vector Decoding, on Lightning."""

__version__ = "0.1.0"
