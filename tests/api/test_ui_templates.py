"""The cluster and curation pages share their header (title, summary with a back link, pager) and
their image cards through web/templates/_macros.html: rendered here without a server."""

from __future__ import annotations

from datetime import datetime, timezone
from types import SimpleNamespace
from urllib.parse import urlencode

import pytest
from retrieval.api.routers.ui import templates


def _query(**values: object) -> str:
    return urlencode({k: v for k, v in values.items() if v not in (None, "", False)})


def page(name: str, **context: object) -> str:
    request = SimpleNamespace(url=SimpleNamespace(path="/ui/clusters"))  # base.html marks the current section
    return templates.env.get_template(name).render(request=request, auth=False, state_query=_query, **context)


CRUN = SimpleNamespace(id=3, k=2, n_images=90, sizes=[60, 30])


def test_cluster_page_header_back_link_pager_and_cards() -> None:
    members = [SimpleNamespace(image_id=10 + i, path=f"a/{i}.jpg", rank=i, distance=0.125 * i) for i in range(2)]
    html = page("cluster.html", crun=CRUN, cluster=1, size=30, members=members, page=2, pages=3, per_page=2)
    assert "<h1>Cluster 1 · 30 images</h1>" in html
    assert ('<p class="summary"><a href="/ui/clusters?run=3">← all clusters of run 3</a> · nearest the centroid '
            "first; the number is the cosine distance to it.</p>") in html
    assert html.count('<nav class="pager"') == 2  # above and below the grid
    assert 'href="?run=3&amp;page=1"' in html and 'href="?run=3&amp;page=3"' in html
    assert html.count('class="card"') == 2
    assert 'href="/?image=11"' in html and 'alt="a/1.jpg (rank 2 in cluster 1)"' in html
    assert '<span class="score">0.125</span><span class="path">a/1.jpg</span>' in html


def test_curation_run_page_header_and_both_kinds_of_card() -> None:
    crun = SimpleNamespace(id=5, mode="sample")
    items = [SimpleNamespace(image_id=1, path="x/1.jpg", how="sample", score=0.5, query="q/cat.jpg",
                             times_retrieved=2, cluster=None),
             SimpleNamespace(image_id=2, path="x/2.jpg", how="cluster", score=None, query=None,
                             times_retrieved=1, cluster=4)]
    html = page("curation_run.html", crun=crun, total=2, items=items, page=1, pages=1)
    assert "<h1>Curation run 5 · sample</h1>" in html
    assert '<p class="summary"><a href="/ui/curation">← all curation runs</a> · 2 images; each shows' in html
    assert 'class="pager"' not in html  # one page: no pager
    assert "retrieved by cat.jpg (2×)" in html and "sampled from cluster 4" in html
    assert html.count('class="card"') == 2 and 'data-id="2"' in html


@pytest.mark.parametrize("pages", [1, 4])
def test_clusters_page_has_the_same_header_without_a_back_link(pages: int) -> None:
    clusters = [SimpleNamespace(cluster=0, size=60, preview=[(1, "a.jpg")])]
    html = page("clusters.html", crun=CRUN, clusters=clusters, page=1, pages=pages, total=2,
                finished=datetime.now(timezone.utc))
    assert "<h1>Clusters · run 3</h1>" in html
    assert '<p class="summary">90 images in 2 clusters (spherical k-means); largest first.' in html
    assert "←" not in html.split("<h1>", 1)[1].split("</p>", 1)[0]
    assert html.count('<nav class="pager"') == (2 if pages > 1 else 0)
