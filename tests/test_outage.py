from tasks.endpoint.outage import OutageDetector, is_outage_failure
from tasks.errors import RequestFailure
from tasks.outputs.index import HashCache, OutputIndex, SortedTable, identity_hash
from tests.builders import Clock


def refused() -> RequestFailure:
    return RequestFailure("connection", "refused")


def test_unreachable_longer_than_the_window_is_an_outage() -> None:
    clock = Clock()
    d = OutageDetector(window=10, clock=clock, describe="http://gpu:8000/v1")
    assert d.failure(refused()) is None
    clock.now = 9.9
    assert d.failure(RequestFailure("timeout", "slow")) is None
    clock.now = 10.0
    verdict = d.failure(refused())
    assert verdict is not None and "http://gpu:8000/v1 has been unreachable for 10 s" in verdict


def test_a_success_inside_the_window_resets_it() -> None:
    clock = Clock()
    d = OutageDetector(window=10, clock=clock)
    d.failure(refused())
    clock.now = 8
    d.success()
    clock.now = 15
    assert d.failure(refused()) is None  # a new window starts here
    clock.now = 24
    assert d.failure(RequestFailure("server_error", "bad gateway", http_status=502)) is None
    clock.now = 25
    assert d.failure(RequestFailure("server_error", "unavailable", http_status=503)) is not None


def test_ordinary_failures_are_not_outages() -> None:
    clock = Clock()
    d = OutageDetector(window=1, clock=clock)
    for t in range(5):
        clock.now = t
        assert d.failure(RequestFailure("bad_request", "too many images", http_status=400)) is None
        assert d.failure(RequestFailure("server_error", "engine", http_status=500)) is None
        assert d.failure(RequestFailure("rate_limited", "slow down", http_status=429)) is None
    assert not is_outage_failure(RequestFailure("rate_limited", "x", http_status=429))
    assert d.final_verdict() is None


def test_rejected_credentials_and_unknown_model() -> None:
    d = OutageDetector(window=60, threshold=3)
    auth = RequestFailure("auth", "Unauthorized", http_status=401)
    assert d.failure(auth) is None and d.failure(auth) is None
    verdict = d.failure(auth)
    assert verdict is not None and "rejected the credentials (HTTP 401) on 3 requests in a row" in verdict
    d = OutageDetector(window=60, threshold=2)
    nf = RequestFailure("not_found", "The model `x` does not exist.", http_status=404)
    d.failure(nf)
    d.success()
    assert d.failure(nf) is None  # the streak restarted
    assert d.failure(nf) is not None


def test_final_verdict_for_small_runs() -> None:
    d = OutageDetector(window=60)
    d.failure(RequestFailure("auth", "Unauthorized", http_status=401))
    assert "rejected the credentials" in (d.final_verdict() or "")
    d = OutageDetector(window=60)
    d.failure(RequestFailure("auth", "Unauthorized", http_status=401))
    d.success()
    assert d.final_verdict() is None
    d = OutageDetector(window=60)
    d.failure(refused())
    assert "could not be reached" in (d.final_verdict() or "")


def test_sorted_table_and_empty_index() -> None:
    from array import array

    table = SortedTable(array("Q", [5, 1, 5, 2**64 - 1]), [array("q", [10, 11, 12, 13])])
    assert table.find(1) == 0 and table.columns[0][table.find(5)] == 12  # the last of equal keys
    assert table.find(2**64 - 1) == 3 and table.find(7) == -1
    assert list(table.duplicates()) == [1]
    empty = OutputIndex.empty()
    assert len(empty) == 0 and empty.lookup("a", "b") is None
    assert HashCache.load([]).get("file:/x") is None
    assert identity_hash("a", "bc") != identity_hash("ab", "c")


def test_an_answer_asking_to_wait_longer_than_a_run_waits_is_an_outage_at_once() -> None:
    """A gateway whose quota is spent for the day: items would each wait out the cap, for hours."""
    d = OutageDetector(window=60, max_wait=300, describe="http://gw/v1")
    assert d.failure(RequestFailure("rate_limited", "slow", http_status=429, retry_after=300)) is None
    verdict = d.failure(RequestFailure("rate_limited", "quota spent", http_status=429, retry_after=86400))
    assert verdict == (
        "http://gw/v1 asks to wait 86400 s before trying again (Retry-After, HTTP 429), longer than a run "
        "waits (300 s): quota spent"
    )


def test_work_item_identities_never_meet_whatever_the_ids_hold() -> None:
    from tasks.inputs.work_items import item_id

    pairs = [("a\x1fb", "c"), ("a", "b\x1fc"), (None, "p"), ("", "p"), ("\x00", "\x1fp"), (None, "\x1fp")]
    assert len({identity_hash(i, p) for i, p in pairs}) == len(pairs)
    assert len({item_id(i, p) for i, p in pairs}) == len(pairs)
