"""The stages of `train_vrfm.py` and the pieces worth testing on their own. Nothing here is imported by
`diffusers_vrfm` itself.

Stages, in the order `train_vrfm.main` calls them: `cli` (parser and checks; imports nothing heavy), `environment`
(accelerate, logging, seed), `data_setup` (pretrained model, VAE, resolution, data, batch layout), `model_setup`
(models, optimiser, EMA, accelerate), `resume`, `validation`, `loop` (the step itself is in `step`), `finish` (prior
fit, pipeline, card, upload). Pieces: `data`, `determinism`, `factory`, `step`, `checkpointing`, `visuals`,
`model_card`.
"""
