"""`Vocab`: a model's compact vocabulary (`vocabulary: corpus` in the LM experiment).

The experiment maps data blocks through it on the way into and out of the model; a saved model's
`token_ids.npy` rebuilds it (`lm.figures` does, to score saved data with saved models).
"""

from __future__ import annotations

import numpy as np


class Vocab:
    """The map between a data source's token ids and a model's compact ids (`vocabulary: corpus`).

    `ids[c]` is the source id of compact id `c`; ids are sorted, so special ids smaller than
    every text id (OPT: <s>=0, <pad>=1, </s>=2, <unk>=3) keep their values.
    """

    def __init__(self, ids: np.ndarray, source_size: int):
        self.ids = np.asarray(ids, np.int32)
        self.lookup = np.full(max(source_size, int(self.ids.max()) + 1), -1, np.int32)
        self.lookup[self.ids] = np.arange(len(self.ids), dtype=np.int32)

    def __len__(self) -> int:
        return len(self.ids)

    def to_model(self, blocks: np.ndarray) -> np.ndarray:
        out = self.lookup[np.asarray(blocks)]
        if (out < 0).any():
            bad = np.asarray(blocks)[out < 0][:5]
            raise ValueError(f"token ids {bad.tolist()} are not in the corpus vocabulary")
        return out

    def to_source(self, blocks: np.ndarray) -> np.ndarray:
        return self.ids[np.asarray(blocks)]
