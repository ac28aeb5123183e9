"""ki_data: LeRobot datasets -> token shards (tokenizers, prompt building, normalization, shards)."""

from ki_data import normalize
from ki_data.fast_tokenizer import FastDecodeError, FastEncodeError, FastTokenizer
from ki_data.normalize import NormStats, compute_stats, load_norm_stats, save_norm_stats
from ki_data.prompt import PromptTokens, PromptTooLongError, build_prompt, model_vocab_size
from ki_data.text_tokenizer import TextTokenizer
# Images, shard schema, LeRobot reading and preprocessing (preprocess engineer).
from ki_data.images import decode_image, encode_image, resize_with_pad
from ki_data.lerobot_source import DatasetFormatError, DatasetNotFoundError
from ki_data.preprocess import BadInputError, PreprocessConfig, PreprocessError, describe_rows, run_preprocess
from ki_data.schema import load_manifest, read_rows
