# The zero-shot protocol shared by the bench scripts (sourced): six tasks through lm-eval, the
# first 400 documents of each (batch-invariant scoring, README "Zero-shot accuracy"), with the
# first 16 x 512 WikiText-2 test windows beside them.
ZS="eval.split=test eval.datasets=[wikitext2] eval.max_windows=16 eval.seqlen=512 eval.tasks=[piqa,arc_easy,arc_challenge,boolq,hellaswag,winogrande] eval.limit=400"
