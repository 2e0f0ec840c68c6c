"""`retrieval verify`: check that database, vector file and FAISS index agree, and say what is wrong."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from sqlalchemy import func, select

from retrieval import ann, runs
from retrieval.layout import IndexLayout
from retrieval.report_text import plural
from retrieval.store import Image, IndexRun, Store
from retrieval.vectors import role_vectors

NORM_TOLERANCE = 1e-2  # fp16 storage keeps unit norms within ~1e-3


@dataclass
class VerifyReport:
    checked: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _examples(ids: np.ndarray, n: int = 5) -> str:
    shown = ", ".join(str(int(i)) for i in ids[:n])
    return shown + (", ..." if len(ids) > n else "")


def verify_index(layout: IndexLayout, db_url: str | None = None) -> VerifyReport:
    report = VerifyReport()
    store = Store(db_url or layout.default_db_url(), readonly=True)
    try:
        meta = store.all_meta()
        ids = np.fromiter(store.image_ids(), dtype=np.int64)
        report.checked.append(f"database: {plural(len(ids), 'image')}")
        dim = meta.get("dim")
        if dim is None:
            if len(ids):
                report.problems.append("images are recorded but the model/dimension metadata is missing; re-index with --rebuild")
            return report
        report.checked.append(f"model {meta.get('model_ref')} ({dim}-d)")
        with store.session() as s:
            stale = s.scalar(select(func.count(Image.id)).where(Image.indexed.is_(False))) or 0
            last_run = runs.latest(s, IndexRun, any_status=True)
        if stale:
            report.problems.append(f"{plural(stale, 'image')} {'is' if stale == 1 else 'are'} embedded but not yet in the FAISS index (an interrupted run); run `retrieval index` again")
        if last_run is not None and last_run.status != runs.COMPLETED:
            report.problems.append(
                f"the last index run (#{last_run.id}) is {last_run.status}: it did not finish; "
                "run `retrieval index` again to complete the work")

        vectors = role_vectors(layout, "search", dim)
        if len(ids):
            if vectors.n_rows <= ids.max():
                report.problems.append(
                    f"vector file {(layout.vectors_path if layout.vectors_path.exists() else layout.legacy_vectors_path).name} holds {plural(vectors.n_rows, 'row')} but ids go up to {ids.max()}")
            else:
                bad = []
                for chunk_ids, chunk in vectors.iter_batches(ids):
                    norms = np.linalg.norm(chunk, axis=1)
                    bad.extend(chunk_ids[np.abs(norms - 1) > NORM_TOLERANCE].tolist())
                if bad:
                    report.problems.append(f"{len(bad):,} stored vectors are not unit length (ids {_examples(np.array(bad))})")
                report.checked.append(f"vectors: {plural(len(ids), 'row')} of {dim}-d fp16, all unit length" if not bad else "vectors")

        spec = meta.get("index")
        if not layout.faiss_path.exists():
            if len(ids):
                report.problems.append(f"FAISS index {layout.faiss_path} is missing; run `retrieval index` to rebuild it")
            return report
        index = ann.load_index(layout.faiss_path, read_only=True)
        if index.d != dim:
            report.problems.append(f"FAISS index is {index.d}-d but the model gives {dim}-d vectors")
        present = ann.index_ids(index)
        if len(present) != len(np.unique(present)):
            report.problems.append(f"FAISS index holds {len(present) - len(np.unique(present)):,} duplicate ids")
        missing = np.setdiff1d(ids, present)
        extra = np.setdiff1d(present, ids)
        if len(missing):
            report.problems.append(f"{plural(len(missing), 'image')} {'is' if len(missing) == 1 else 'are'} not in the FAISS index (ids {_examples(missing)})")
        if len(extra):
            report.problems.append(f"FAISS index holds {len(extra):,} ids that are not images (ids {_examples(extra)})")
        if index.ntotal != len(ids):
            report.problems.append(f"FAISS index holds {plural(index.ntotal, 'vector')}, the database {plural(len(ids), 'image')}")
        if spec is None:
            report.problems.append("the index parameters are not recorded in the database")
        else:
            report.checked.append(
                f"FAISS {spec['factory']}: {plural(index.ntotal, 'vector')}, ids match"
                + (f", nprobe {spec['params'].get('nprobe')}" if spec["params"].get("nprobe") else ""))
        return report
    finally:
        store.close()
