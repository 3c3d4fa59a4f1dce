"""Layer 7 — training: configuration, DeepSpeed engine set-up, the loop, evaluation, checkpoints,
logging, throughput and MFU.

    config        the JSON schema (pydantic), overrides, DeepSpeed keys, start-up checks
    distributed   rank / world / master discovery (torchrun, deepspeed, SLURM, MPI), process group
    data          demo corpus / text files / indexed dataset -> train and validation datasets
    engine        GPT + AdamW + LR schedule -> deepspeed.initialize
    schedule      warm-up + cosine / linear decay
    checkpoint    atomic save, resume, keep-last, layout checks
    trainer       pretrain(cfg): the loop
    progress      console lines and TensorBoard scalars (rank 0)
    metrics       tokens/s, MFU, ETA
    quant_error   per-layer quantization error probes
    signals       SIGUSR1 / SIGTERM -> checkpoint and exit 75
    export_hf     checkpoint -> Hugging Face GPT-2 directory
    config_docs   docs/CONFIG.md from the schema

Submodules are imported on use (nothing heavy happens on `import megaq.training`).
"""
