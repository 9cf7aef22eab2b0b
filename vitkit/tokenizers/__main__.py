"""``python -m vitkit.tokenizers --data cifar10 --root DIR --out FOLDER``: train a VQ tokenizer (``vq.main``)."""
from vitkit.tokenizers.vq import main

raise SystemExit(main())
