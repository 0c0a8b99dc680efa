"""Deprecated name: mBART import and export live in lmforge.seq2seq.bart with BART and Marian."""

import warnings

from lmforge.seq2seq.bart import OFFSET, check_exportable  # noqa: F401
from lmforge.seq2seq.bart import bart_config_from_model as mbart_config_from_model  # noqa: F401
from lmforge.seq2seq.bart import bart_to_lmforge as mbart_to_lmforge  # noqa: F401
from lmforge.seq2seq.bart import export as to_mbart  # noqa: F401
from lmforge.seq2seq.bart import lmforge_to_bart as lmforge_to_mbart  # noqa: F401

warnings.warn("lmforge.interop.mbart moved to lmforge.seq2seq.bart.", DeprecationWarning, stacklevel=2)
