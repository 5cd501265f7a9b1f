from setuptools import find_packages, setup

setup(
    name="recllm",
    version="0.1.0",
    description="Align LLaMA-family language models with user/item IDs for recommendation (Ray + DeepSpeed).",
    python_requires=">=3.10",
    packages=find_packages(include=["launcher*", "trainers*", "data_pipeline*", "ranking*", "inference*", "cluster*"]),
    package_data={"": ["*.json", "*.yaml", "*.txt"]},
    entry_points={"console_scripts": ["recllm=launcher.cli:main"]},
)
