"""The special tokens every TWilBert vocabulary holds at fixed ids, and the label of unpredicted tokens.

Apart from batching so that the data stages (corpus, vocabulary, pairs) never import torch: its
import costs ~3 s of each stage process, and its ~250k objects every forked tokenizer worker."""

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[MASK]", "[CLS]", "[SEP]")
PAD_ID, UNK_ID, MASK_ID, CLS_ID, SEP_ID = range(len(SPECIAL_TOKENS))
N_SPECIAL = len(SPECIAL_TOKENS)
IGNORE_INDEX = -100  # label of tokens that are not predicted (torch's cross-entropy default)
