"""Item-identifier stage (dataset/ -> item_ids/): how the LM names items, by one of four schemes.

atomic and subtoken name items by their IDs; semantic learns L x C codes from the baseline's SASRec item
embeddings (with an optional LLM-alignment loss); precomputed imports an LC-Rec index. ``build_ids.run_build_ids``
is the stage.
"""
