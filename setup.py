from setuptools import find_packages, setup

setup(
    name="rcml",
    version="0.1.0",
    description="Distributed pretraining of relation-conditioned image-text models (RCML)",
    python_requires=">=3.10",
    packages=find_packages(include=["rcml", "rcml.*", "kernels", "kernels.*", "data_prep", "data_prep.*", "launch"]),
    # Dependencies are pinned in requirements.txt and installed by `make install` with torch first;
    # listing `torch` here would let pip replace the CPU build by a multi-GB CUDA one.
    install_requires=[],
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
