"""Self-supervised pretraining of a backbone on every image of a manifest (MoCo v2, BYOL).

`cxrdistill pretrain --config pretrain_moco` writes ``RUN_DIR/model.safetensors`` (the backbone
alone), which any recipe loads with ``model.pretrained=RUN_DIR``.
"""
