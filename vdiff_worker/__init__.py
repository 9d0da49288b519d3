"""The vdiff worker: models, tokenizer, engine and samplers behind a ZeroMQ link."""
