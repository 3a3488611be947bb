"""Tiny, randomly initialized ``transformers`` models saved as Hugging Face model directories (the
``test`` extra installs ``transformers``; loom itself never imports it)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from loom.config import load_config
from loom.models import build_model
from loom.models.hf import hf_model_settings
from loom.train.hf import check_hf_weights, load_hf_weights

VOCAB = 320  # 256 bytes + <|endoftext|> + merges; divisible by 2 for vocabulary-parallel splits


def imported(path: Path, overrides=()):
    """The Hugging Face model directory ``path`` as loom reads it: (config, model in eval mode). The
    model is initialized before the weights are read over it, so a parameter the reading misses fails
    the comparison with ``transformers``."""
    cfg = load_config(None, list(overrides), settings=hf_model_settings(path))
    check_hf_weights(path, cfg.model)
    model = build_model(cfg.model, "cpu")
    model.init_weights(cfg.train.seed)
    load_hf_weights([model], cfg.model, path)
    return cfg, model.eval()


def tiny_tokenizer(texts: list[str]):
    """A byte-level BPE of ``VOCAB`` tokens with ``<|endoftext|>``, as a ``transformers`` fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


def gpt2_dir(path: Path, texts: list[str], seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 4,
             n_positions: int = 32, dtype: torch.dtype = torch.float32, **save_kwargs):
    """A random ``GPT2LMHeadModel`` and its tokenizer saved into ``path``; returns the model (eval mode)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    tok = tiny_tokenizer(texts)
    config = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=n_positions,
                        vocab_size=VOCAB, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = GPT2LMHeadModel(config).to(dtype).eval()
    model.save_pretrained(path, **save_kwargs)
    tok.save_pretrained(path)
    return model


def llama_dir(path: Path, texts: list[str], seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 4,
              n_kv_head: int = 2, max_positions: int = 32):
    """A random ``LlamaForCausalLM`` (grouped-query attention: ``n_kv_head`` key/value heads) and its
    tokenizer saved into ``path``; returns the model (eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer(texts)
    config = LlamaConfig(hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
                         num_key_value_heads=n_kv_head, intermediate_size=2 * n_embd, vocab_size=VOCAB,
                         max_position_embeddings=max_positions, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def bert_tokenizer():
    """A WordPiece ``BertTokenizerFast`` of ``VOCAB`` tokens: BERT's specials, single characters and their
    ``##`` continuations, a few words."""
    from transformers import BertTokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    words = ["def", "return", "import", "print", "for", "range", "pass", "os"]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]
    vocab += [f"tok{i}" for i in range(VOCAB - len(vocab))]
    return BertTokenizerFast(vocab={t: i for i, t in enumerate(vocab)})


def bert_dir(path: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 4, max_positions: int = 32,
             num_labels: int = 0):
    """A random ``BertForPreTraining`` (``BertForSequenceClassification`` of ``num_labels`` classes when
    ``num_labels``) and its WordPiece tokenizer saved into ``path``; returns the model (eval mode)."""
    from transformers import BertConfig, BertForPreTraining, BertForSequenceClassification

    torch.manual_seed(seed)
    tok = bert_tokenizer()
    config = BertConfig(hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
                        intermediate_size=2 * n_embd, vocab_size=VOCAB, max_position_embeddings=max_positions,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_labels or 2,
                        initializer_range=0.3)  # weights large enough that GELU's approximation shows
    model = (BertForSequenceClassification(config) if num_labels else BertForPreTraining(config)).eval()
    with torch.no_grad():  # non-trivial LayerNorms and biases, so a mapping that misses one fails
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model


def vit_dir(path: Path, seed: int = 0, n_layer: int = 2, n_embd: int = 32, n_head: int = 4, image_size: int = 8,
            patch_size: int = 2, channels: int = 3, num_labels: int = 5):
    """A random ``ViTForImageClassification`` saved into ``path``; returns the model (eval mode)."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=n_embd, num_hidden_layers=n_layer, num_attention_heads=n_head,
                       intermediate_size=2 * n_embd, image_size=image_size, patch_size=patch_size,
                       num_channels=channels, num_labels=num_labels, initializer_range=0.3)
    model = ViTForImageClassification(config).eval()
    with torch.no_grad():  # non-trivial LayerNorms, biases, [CLS] and positions, so a mapping that misses one fails
        for name, p in model.named_parameters():
            if "layernorm" in name or name.endswith("bias") or "embeddings." in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    return model


def t5_tokenizer(texts: list[str]):
    """A SentencePiece-style Unigram tokenizer (whitespace split, ``▁`` word marks) of at most ``VOCAB``
    tokens with T5's ``<pad>`` (0), ``</s>`` (1) and ``<unk>`` (2), as a ``transformers`` ``T5TokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace()])  # T5's
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=VOCAB, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>",
                                      show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0)


def t5_spiece(path: Path, texts: list[str], vocab_size: int = 120) -> None:
    """A SentencePiece unigram model trained on ``texts`` with T5's layout (``<pad>`` 0, ``</s>`` 1,
    ``<unk>`` 2, no bos) written as ``path/spiece.model``, as T5's directories hold it."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   hard_vocab_limit=False, minloglevel=2, num_threads=1)
    (Path(path) / "spiece.model").write_bytes(model.getvalue())


def llama_spm(path: Path, texts: list[str], vocab_size: int = 300) -> None:
    """A SentencePiece BPE model trained on ``texts`` with Llama's layout and options (``<unk>`` 0, ``<s>`` 1,
    ``</s>`` 2, no padding piece; byte fallback, digits split, text kept as it is) written as
    ``path/tokenizer.model``, as the original Llama and Llama-2 directories hold it."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
                                   model_type="bpe", byte_fallback=True, split_digits=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
                                   num_threads=1)
    (Path(path) / "tokenizer.model").write_bytes(model.getvalue())


def t5_dir(path: Path, texts: list[str], seed: int = 0, v1_1: bool = False, own_head: bool = True, n_layer: int = 2,
           decoder_layers: int = 3, n_embd: int = 32, n_head: int = 4):
    """A random ``T5ForConditionalGeneration`` and its tokenizer saved into ``path``; returns the model
    (eval mode). ``v1_1``: T5 v1.1's shape (gated-GELU feed-forward, no output scaling), else T5's
    (ReLU, the output projection tied to the embedding and scaled by d^-0.5). ``own_head`` (v1.1): its
    output projection its own, as the released v1.1 checkpoints hold it (transformers 5 ties it to the
    embedding and saves it once, with ``scale_decoder_outputs=false``: ``own_head=False``)."""
    from safetensors.torch import load_file, save_file
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    tok = t5_tokenizer(texts)
    config = T5Config(vocab_size=VOCAB, d_model=n_embd, d_kv=n_embd // n_head, d_ff=2 * n_embd, num_layers=n_layer,
                      num_decoder_layers=decoder_layers, num_heads=n_head, dropout_rate=0.0, n_positions=32,
                      feed_forward_proj="gated-gelu" if v1_1 else "relu", tie_word_embeddings=not v1_1,
                      layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # non-trivial norms, so a mapping that misses one fails
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if not (v1_1 and own_head):
        return model
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] = torch.randn_like(weights["shared.weight"])
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((path / "config.json").read_text())
    config.pop("scale_decoder_outputs", None)
    (path / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    return T5ForConditionalGeneration.from_pretrained(path).eval()
