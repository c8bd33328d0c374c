from setuptools import find_packages, setup

setup(
    name="rcml",
    version="0.1.0",
    description="Distributed pretraining of relation-conditioned image-text models (RCML)",
    python_requires=">=3.10",
    packages=find_packages(include=["rcml", "rcml.*", "kernels", "kernels.*", "data_prep", "data_prep.*", "launch"]),
    # requirements.txt pins the versions tested together; `make install` installs torch first, then those
    # pins, then this package with --no-deps. The ranges below (from each pin up to its next major, the next
    # minor for 0.x) let `pip install -e .` complete an environment that already has torch. `torch` itself
    # is not listed: pip could then replace the CPU build by a multi-GB CUDA one.
    install_requires=[
        "triton>=3.7.1,<4",
        "deepspeed>=0.19.8,<0.20",
        "ninja>=1.13.2,<2",
        "numpy>=2.4.6,<3",
        "webdataset>=1.0.2,<2",
        "braceexpand>=0.1.7,<0.2",
        "pillow>=13.0.0,<14",
        "transformers>=5.23.0,<6",
        "huggingface-hub>=2.4.0,<3",
        "tokenizers>=0.23.3,<0.24",
        "safetensors>=0.8.0,<0.9",
        "pyarrow>=25.0.1,<26",
        "mlflow>=3.17.2,<4",
        "tqdm>=4.70.1,<5",
        "pyyaml>=6.0.4,<7",
        "matplotlib>=3.11.2,<4",
        "resvg-py>=0.5.0,<0.6",
    ],
    entry_points={
        "console_scripts": [
            "rcml-build-shards=data_prep.build_shards:main",
            "rcml-synthetic=data_prep.synthetic:main",
            "rcml-train-tokenizer=data_prep.train_tokenizer:main",
            "rcml-inspect=data_prep.inspect:main",
            "rcml-emoji=data_prep.emoji:main",
            "rcml-emoji-fetch=data_prep.emoji_fetch:main",
            "rcml-pretrain=launch.pretrain:main",
            "rcml-evaluate=launch.evaluate:main",
            "rcml-export-init=launch.export_init:main",
        ]
    },
)
