import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402

# one thread per xdist worker (the workers already fill the cores); otherwise follow OMP_NUM_THREADS
_threads = 1 if os.environ.get("PYTEST_XDIST_WORKER") else int(os.environ.get("OMP_NUM_THREADS", 0) or 2)
torch.set_num_threads(max(1, min(_threads, os.cpu_count() or 1)))


def char_tokenizer_dir(folder):
    """A character-level HF tokenizer (N = 48, EOS '<eos>') saved as folder/tokenizer.json."""
    import string

    import tokenizers as hf

    chars = list(string.ascii_lowercase + string.digits + " .,'-$&<>N")
    vocab = {"<eos>": 0, "<unk>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tk = hf.Tokenizer(hf.models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = hf.pre_tokenizers.Split(hf.Regex("."), behavior="isolated")
    tk.add_special_tokens([hf.AddedToken("<eos>", special=True)])
    folder.mkdir(parents=True, exist_ok=True)
    tk.save(str(folder / "tokenizer.json"))
    return folder


def tiny_bert_checkpoint(folder):
    """A pretrained folder: tiny γ-hybrid Block model over the bert-base-uncased vocabulary (random weights,
    scaled up so that samples differ by seed)."""
    import torch

    from hdlm.checkpoint import save_pretrained
    from hdlm.config import Config, DataConfig, ModelConfig, ProcessConfig, SampleConfig, ScheduleConfig
    from hdlm.model import HDLMTransformer
    from hdlm.tokenizers import load_tokenizer

    tok = load_tokenizer("bert-base-uncased")
    cfg = Config(model=ModelConfig(vocab_size=tok.vocab_size, length=16, n_layers=1, hidden=16, n_heads=2,
                                   mlp_ratio=2, cond_dim=8, dropout=0.0, pad_vocab_to=64),
                 process=ProcessConfig(kind="gamma", gamma=0.05),
                 schedule=ScheduleConfig(kind="block", width=4, rho=2.0),
                 data=DataConfig(tokenizer="bert-base-uncased"),
                 sample=SampleConfig(num_samples=3, batch_size=2, seed=7))
    torch.manual_seed(0)
    model = HDLMTransformer(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return save_pretrained(model, cfg, tok.identity(), folder / "tiny")
