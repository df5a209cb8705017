"""The text files a Hugging Face export carries beside its weights: ``TOKENIZER.md`` (how to feed
it what twilbert fed the model) and ``tokenizer_config.json``."""

from __future__ import annotations

TOKENIZER_NOTE = """# Tokenizer of this export

Exported by `twilbert export-hf` from `{source}` as `{hf_class}`.

- The vocabulary is twilbert's SentencePiece model, copied as `spiece.model` (and as `spm.model`, with
  `meta.json`, so `twilbert.data.tokenizer.Tokenizer("<this dir>")` loads it too). `tokenizer_config.json`
  declares it an `AlbertTokenizer` that keeps case and accents, so `AutoTokenizer.from_pretrained("<this dir>")`
  gives the ids twilbert gives, for BERT-layout exports too: [PAD]=0 [UNK]=1 [MASK]=2 [CLS]=3 [SEP]=4, inputs
  `[CLS] a [SEP] (b [SEP])`, token_type_ids 0 then 1.
- Tweet normalization is NOT part of the Hugging Face tokenizer. Apply the preprocessing the model was
  trained with first (the `preprocess` section of `meta.json`):
  `Preprocessor.from_dict(json.load(open("meta.json"))["preprocess"])(text)` from `twilbert.data.preprocess`.
- The model has {max_positions} positions: at most {max_single} tokens per single text, truncate to that.
{classifier_note}"""

CLASSIFIER_NOTE = """
## The classifier

- `config.json` has `id2label` (the task's classes in output order), `label2id` and `problem_type`
  ({problem_type}); `transformers.pipeline("text-classification", model="<this dir>")` applies softmax
  (single-label), sigmoid (multi-label: the labels at or over {threshold} are the prediction) or nothing
  (regression) as `twilbert predict` does.
- `twilbert predict` cuts each text to {max_len_test} tokens (`max_len_test`); pass texts of at most that
  length, or truncate them, for identical scores.
{head_note}"""

POOLER_HEAD_NOTE = """- The head is [CLS] -> linear. Hugging Face's pooler (dense + tanh) in front of it is exported as a
  tiny scaled identity (and the classifier scaled back), so the logits are twilbert's to float32
  rounding; finetuning this export further starts from that scaled pooler.
"""

CUSTOM_HEAD_NOTE = """- The head ({head}) is twilbert's own: Hugging Face's `*ForSequenceClassification` reads the [CLS]
  state through a tanh pooler only. It is the class `{hf_class}` in `{module}.py`, beside the weights,
  named in `config.json`'s `auto_map` (its settings: `twilbert_head`). Load it with
  `trust_remote_code=True`, which runs that file (read it first: it imports torch and transformers only):
  `AutoModelForSequenceClassification.from_pretrained("<this dir>", trust_remote_code=True)`, or
  `pipeline("text-classification", model="<this dir>", trust_remote_code=True)`. Its logits are twilbert's
  to float32 rounding.
"""


def tokenizer_config(max_positions: int) -> dict:
    """Hugging Face tokenizer settings that reproduce twilbert's SentencePiece encoding."""
    return {
        "tokenizer_class": "AlbertTokenizer",
        "do_lower_case": False,  # any lowercasing is inside the SentencePiece normalizer already
        "keep_accents": True,
        "remove_space": True,
        "unk_token": "[UNK]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "sep_token": "[SEP]",
        "mask_token": "[MASK]",
        "bos_token": "[CLS]",
        "eos_token": "[SEP]",
        "model_max_length": max_positions,
        "model_input_names": ["input_ids", "token_type_ids", "attention_mask"],
    }
