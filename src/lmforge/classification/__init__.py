"""Text classifiers (sentiment and the like), in one place:

    model.py       the classifier: a sequence body (BiLSTM, or a language model's), pooling, a linear head
    inference.py   classifier checkpoints (lmforge's own; BERT/DistilBERT/RoBERTa ones mapped onto them),
                   predict, evaluate_classifier
    training.py    `lmforge train-classifier` on the shared training loop

The run's settings are config.py's ClassifierRunConfig (the sections every run has).
"""
