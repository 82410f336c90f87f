"""Integrations with the Hugging Face stack: transformers (``attn_implementation="fcp"``,
:mod:`.transformers`), Accelerate (:mod:`.accelerate`: ``FCPPlugin``), ``Trainer`` (:mod:`.trainer`; evaluation
and prediction in :mod:`.predict`), TRL (:mod:`.sft`: ``FCPSFTTrainer``), PEFT adapters (:mod:`.adapters`), the
data path (:mod:`.collator`, :mod:`.sampler`) and the download-free defaults (:mod:`.embedded`,
:mod:`.embedded_chat`). Each module imports the library it integrates with on its own, so importing one costs
only what it needs."""
