"""Training-sample stage (dataset/ + item_ids/ -> samples/): the alignment tasks of Semantic Convergence / LC-Rec.

Prompts come from paraphrased templates shipped in ``templates/*.json``; items are written with the tokens of
the run's identifier scheme. ``build_samples.run_build_samples`` is the stage; the trainer reads samples/.
"""
