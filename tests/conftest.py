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
