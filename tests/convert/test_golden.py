"""The converter's output files are byte-identical to what it wrote before its speed work (issue 20).

The digests were recorded with the code of commit 44ef748, before any of the changes that made the converter
and launch-time widening faster: one sha256 over the sorted {file: sha256} of every weight file of each job.
A change to the clone rules, the noise values, the chunking or the file writer that moves a single bit fails here.
"""

from __future__ import annotations

import hashlib
import json

import pytest

from megaclone.convert import ConvertOptions, convert_checkpoint
from tests.convert import ARCHS, layout_digests, make_source

JOBS = {
    "widen-x2-symmetric-nonoise": dict(tp_size=4, pp_size=2, hyperclone=2, clone_variant="symmetric"),
    "widen-x2-diagonal-0db": dict(tp_size=4, pp_size=1, hyperclone=2, clone_variant="diagonal", clone_noise_db=0.0,
                                  clone_seed=5),
    "widen-x3-symmetric-10db": dict(tp_size=1, pp_size=2, hyperclone=3, clone_variant="symmetric",
                                    clone_noise_db=10.0),
    "reshard-tp4-pp1": dict(tp_size=4, pp_size=1),
}
RECORDED = {  # from commit 44ef748 (source: tests.convert.make_source at TP2 x PP2, seed 0; chunks of 48 bytes)
    "gqa-swiglu-rms-learned-nobias-untied/widen-x2-symmetric-nonoise":
        "2f47f317dc202111cfc9bf2f872c25d9c22871c5823e09b881356e2d80685655",
    "gqa-swiglu-rms-learned-nobias-untied/widen-x2-diagonal-0db":
        "a0a58dd2cd588533af82d672636164f7687d8a257c89505c2848b8d8dc622595",
    "gqa-swiglu-rms-learned-nobias-untied/widen-x3-symmetric-10db":
        "2bdfdc77f4e4d4226cdf15941a860197584259cc13d61e9e6aae7e7f518bef4d",
    "gqa-swiglu-rms-learned-nobias-untied/reshard-tp4-pp1":
        "866c58147f72a1ce8c145be801b707d8252a9599ed5c0998ed4db87c1e43b838",
    "mha-gelu-ln-rope-bias-tied/widen-x2-symmetric-nonoise":
        "5d0c41a7087c91c1ae57b5eb688d43507459bfe234cb1e54c47846a6e950ce71",
    "mha-gelu-ln-rope-bias-tied/widen-x2-diagonal-0db":
        "ba6752fb4c6db1e469bed9a66e4f92f389897bd9e73d50b2b480133fbad4a903",
    "mha-gelu-ln-rope-bias-tied/widen-x3-symmetric-10db":
        "afbfef8916fbf0d749d6656d95673085b6846b2c38bc042786a31e1646e66c1d",
    "mha-gelu-ln-rope-bias-tied/reshard-tp4-pp1":
        "97e97aef1452097ab386beb7ea733eb1ba9d62ad3134c7333e4045e5038dfdfe",
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    base = tmp_path_factory.mktemp("golden")
    return {arch: make_source(base / arch, arch, 2, 2) for arch in ARCHS}


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("job", sorted(JOBS))
def test_output_bytes_unchanged(sources, tmp_path, arch: str, job: str) -> None:
    options = JOBS[job]
    step = convert_checkpoint(ConvertOptions(input=sources[arch], output=tmp_path / "out", chunk_bytes=48,
                                             progress=False, **options)).output
    digests = layout_digests(step, options["tp_size"], options["pp_size"])
    assert hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest() == RECORDED[f"{arch}/{job}"]


def test_page_cache_writes_give_the_same_bytes(sources, tmp_path) -> None:
    """`--no-direct-io` (ConvertOptions.direct_io=False) writes the same files through the page cache."""
    arch, job = sorted(ARCHS)[0], "widen-x2-diagonal-0db"
    options = JOBS[job]
    step = convert_checkpoint(ConvertOptions(input=sources[arch], output=tmp_path / "out", chunk_bytes=48,
                                             progress=False, direct_io=False, **options)).output
    digests = layout_digests(step, options["tp_size"], options["pp_size"])
    assert hashlib.sha256(json.dumps(digests, sort_keys=True).encode()).hexdigest() == RECORDED[f"{arch}/{job}"]
