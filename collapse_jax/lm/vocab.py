"""`Vocab`: a model's compact vocabulary (`vocabulary: corpus` in the LM experiment).

The experiment maps data blocks through it on the way into and out of the model; a saved model's
`token_ids.npy` rebuilds it (`lm.figures` does, to score saved data with saved models).
The experiment builds it from the training blocks only; ids it has not seen (in the validation or
test blocks) map to one bucket, the tokenizer's UNK id.
"""

from __future__ import annotations

import numpy as np


class Vocab:
    """The map between a data source's token ids and a model's compact ids (`vocabulary: corpus`).

    `ids[c]` is the source id of compact id `c`; ids are sorted, so special ids smaller than
    every text id (OPT: <s>=0, <pad>=1, </s>=2, <unk>=3) keep their values. With `unk_id` (a
    source id among `ids`), every source id not in `ids` maps to the compact id of `unk_id`
    (and comes back as `unk_id`); without it, such ids are an error.
    """

    def __init__(self, ids: np.ndarray, source_size: int, unk_id: int | None = None):
        self.ids = np.asarray(ids, np.int32)
        self.unk_id = unk_id
        self.lookup = np.full(max(source_size, int(self.ids.max()) + 1), -1, np.int32)
        self.lookup[self.ids] = np.arange(len(self.ids), dtype=np.int32)
        if unk_id is not None:
            if not 0 <= unk_id < len(self.lookup) or self.lookup[unk_id] < 0:
                raise ValueError(f"unk_id {unk_id} is not one of the vocabulary's ids")
            self.lookup[self.lookup < 0] = self.lookup[unk_id]

    def __len__(self) -> int:
        return len(self.ids)

    def to_model(self, blocks: np.ndarray) -> np.ndarray:
        blocks = np.asarray(blocks)
        if self.unk_id is not None and blocks.size and blocks.max() >= len(self.lookup):
            blocks = np.where(blocks < len(self.lookup), blocks, self.unk_id)
        out = self.lookup[blocks]
        if (out < 0).any():
            bad = np.asarray(blocks)[out < 0][:5]
            raise ValueError(f"token ids {bad.tolist()} are not in the corpus vocabulary")
        return out

    def to_source(self, blocks: np.ndarray) -> np.ndarray:
        return self.ids[np.asarray(blocks)]
