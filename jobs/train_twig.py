"""Train a TwigVLM twig on a frozen base VLM and write it next to the model (or anywhere).

    # the committed demo twig (shapes world generated in memory; held-out: items of the same seed after the
    # training ones); about 5 minutes on 2 CPU cores
    python jobs/train_twig.py --model models/shapes-llava --out models/shapes-llava/twig --K 1 --T 1 \\
        --seed 1111 --images 4000 --videos 1000 --steps 600 --batch-size 16 --lr 1e-3 --distill 10
    # a corpus written by jobs/make_corpus.py
    python jobs/train_twig.py --model models/shapes-llava --corpus /tmp/shapes --out /tmp/twig
    # LLaVA-665K on a cluster: Ray Train, 8 GPU workers, DDP on the twig
    python jobs/train_twig.py --model s3://bucket/llava-1.5-7b-hf/ --llava-json llava_v1_5_mix665k.json \\
        --image-folder s3://bucket/llava-data/ --out s3://bucket/twigs/llava-1.5-7b-K2-T3 \\
        --K 2 --T 3 --lr 1e-4 --batch-size 16 --steps 5200 --ray-workers 8 --use-gpu

Entry point only: the job is ``training.twig_cli.main`` (console script ``vlm-train-twig``).
"""

import sys

from training.twig_cli import main

if __name__ == "__main__":
    sys.exit(main())
