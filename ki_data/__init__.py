"""ki_data: LeRobot datasets -> token shards (tokenizers, prompt building, normalization, shards)."""

from ki_data import normalize
from ki_data.fast_tokenizer import FastDecodeError, FastEncodeError, FastTokenizer
from ki_data.normalize import NormStats, compute_stats, load_norm_stats, save_norm_stats
from ki_data.prompt import PromptTokens, PromptTooLongError, build_prompt, model_vocab_size
from ki_data.text_tokenizer import TextTokenizer
