"""Captured functions (lipcodec.graphs) and the planner's captured decisions."""

import threading

import pytest
import torch

import lipcodec
from lipcodec.graphs import Graphs, _Entry
from lipcodec.planners.lipar import Lipar

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (CUDA graphs)")


def chain(x, y):
    """A few dependent kernels with a gather, as a decision has."""
    order = (x * y).argsort()
    return x[order] + y, (x > y).sum()


def test_on_the_cpu_the_function_just_runs():
    graphs, calls = Graphs(), []

    def fn(x):
        calls.append(x)
        return (x + 1,)

    x = torch.arange(3.0)
    for _ in range(3):
        (out,) = graphs("k", fn, x)
        assert torch.equal(out, x + 1)
    assert len(calls) == 3 and not graphs._entries  # nothing captured, nothing kept
    (out,) = graphs("k", fn, x, first=lambda x: (x + 2,))  # where nothing is captured, `first` runs
    assert torch.equal(out, x + 2) and len(calls) == 3


@cuda
def test_captured_replays_equal_eager_runs_with_fresh_outputs():
    graphs = Graphs()
    g = torch.Generator("cuda").manual_seed(0)
    inputs = [(torch.rand(1000, device="cuda", generator=g), torch.rand(1000, device="cuda", generator=g))
              for _ in range(4)]
    outs = [graphs("chain", chain, *xy) for xy in inputs]
    assert [type(e) for e in graphs._entries.values()] == [_Entry]  # captured on the second call
    for (x, y), out in zip(inputs, outs):  # earlier outputs survive later replays
        expected = chain(x, y)
        assert all(torch.equal(a, b) for a, b in zip(out, expected))
    (other,) = graphs("other", lambda x: (x * 2,), inputs[0][0][:10])  # another key, another graph
    assert torch.equal(other, inputs[0][0][:10] * 2)
    graphs.clear()
    assert not graphs._entries


@pytest.mark.needs_cxx
def test_compiling_happens_before_the_capture_and_says_when_it_cannot():
    """What a capture with compile=True captures (here on the CPU, the code is the same):
    the compiled function, already compiled; past dynamo's recompile limit the function
    itself, with a warning; a function dynamo cannot trace whole (a host sync in a
    planner's own postprocess) is an error that names it and the way out."""
    import functools

    from lipcodec.graphs import _compile

    x, y = torch.rand(64), torch.rand(64)
    compiled = _compile(chain, (x, y))
    assert compiled is not chain and all(torch.equal(a, b) for a, b in zip(compiled(x, y), chain(x, y)))

    class Syncing:
        def settle(self, x):
            return (x + 1,) if float(x.sum()) > 0 else (x - 1,)

    with pytest.raises(RuntimeError, match=r"could not compile Syncing\.settle .*run it with compile=False"):
        _compile(functools.partial(Syncing().settle), (x,))

    def scaled(k, x):
        return (x * k,)

    first, second = functools.partial(scaled, 2.0), functools.partial(scaled, 3.0)
    limit = torch._dynamo.config.recompile_limit
    with torch._dynamo.config.patch(recompile_limit=1):  # (monkeypatch's undo would delete the setting)
        assert torch.equal(_compile(first, (x,))(x)[0], x * 2)
        with pytest.warns(UserWarning, match="recompile limit is reached"):
            assert _compile(second, (x,)) is second
    assert torch._dynamo.config.recompile_limit == limit


@cuda
def test_compiled_captures_equal_eager_runs():
    """compile=True captures torch.compile(fn), compiled before the capture: the same outputs.
    Past dynamo's recompile limit a function is captured uncompiled, with a warning."""
    import functools

    graphs = Graphs()
    x, y = torch.rand(1000, device="cuda"), torch.rand(1000, device="cuda")
    for _ in range(3):
        out = graphs("chain", chain, x, y, compile=True)
        assert all(torch.equal(a, b) for a, b in zip(out, chain(x, y)))
    assert [k[1] for k, e in graphs._entries.items() if isinstance(e, _Entry)] == [True]

    def scaled(k, x):  # a fresh function: no compiled entries yet
        return (x * k + 1,)

    with torch._dynamo.config.patch(recompile_limit=1):
        for k in (2.0, 3.0):  # each k is another guard: the second compile is past the limit
            fn = functools.partial(scaled, k)
            graphs(("scaled", k), fn, x, compile=True)
            if k == 2.0:
                graphs(("scaled", k), fn, x, compile=True)
            else:
                with pytest.warns(UserWarning, match="recompile limit is reached"):
                    graphs(("scaled", k), fn, x, compile=True)
            (out,) = graphs(("scaled", k), fn, x, compile=True)
            assert torch.equal(out, x * k + 1)


class Unmarked(Lipar):
    """A custom clean-up that reads a value back (not capturable) and is not marked."""

    def postprocess(self, reuse):
        return reuse if float(reuse.float().mean()) > 0.99 else super().postprocess(reuse)


def test_decisions_are_captured_only_with_a_graph_safe_postprocess():
    from lipcodec.gop import Schedule
    from lipcodec.planners import get as get_planner

    schedule = Schedule.parse("IPPP")
    assert get_planner("lipar")._graph_key(schedule, (4, 6), 10) is not None  # marked graph_safe
    assert get_planner("motion")._graph_key(schedule, (4, 6), 10) is not None  # no clean-up at all
    assert Unmarked()._graph_key(schedule, (4, 6), 10) is None
    # what the search changes is not part of the key: one graph serves every decision of it
    assert get_planner("lipar", target_kept=0.5, search_from=2.0)._graph_key(schedule, (4, 6), 10) == \
        get_planner("lipar")._graph_key(schedule, (4, 6), 10)
    # nor are the frame types: on a GPU a decision reads only the schedule's length
    lipar = get_planner("lipar")
    assert lipar._graph_key(Schedule.parse("IPIP"), (4, 6), 10) == lipar._graph_key(schedule, (4, 6), 10) != \
        lipar._graph_key(Schedule.parse("IPPPP"), (4, 6), 10)


@cuda
def test_an_unmarked_postprocess_runs_eagerly_on_the_gpu():
    from lipcodec.planners.reference import DECISION_GRAPHS

    latents = torch.randn(1, 16, 6, 16, 16).cumsum(2)
    on_cpu = lipcodec.plan(latents, Unmarked(target_kept=0.6))
    DECISION_GRAPHS.clear()
    for _ in range(2):
        assert torch.equal(lipcodec.plan(latents.cuda(), Unmarked(target_kept=0.6)).source.cpu(), on_cpu.source)
    assert not DECISION_GRAPHS._entries


@cuda
def test_the_least_recently_used_graph_leaves_first():
    graphs = Graphs(size=1)
    x = torch.rand(100, device="cuda")
    for key, fn in [("double", lambda x: (x * 2,)), ("double", lambda x: (x * 2,)),
                    ("square", lambda x: (x * x,)), ("square", lambda x: (x * x,))]:
        graphs(key, fn, x)
    assert [k[0] for k in graphs._entries] == ["square"]  # "double" was dropped
    ((out,), (again,)) = graphs("double", lambda x: (x * 2,), x), graphs("square", lambda x: (x * x,), x)
    assert torch.equal(out, x * 2) and torch.equal(again, x * x)  # seen anew, eagerly, and right


@cuda
def test_replays_from_two_threads_on_their_own_streams():
    """The stream runner plans in a worker thread on a side stream: replays there and on the
    main thread must not overwrite each other's inputs."""
    graphs = Graphs()
    x, y = torch.rand(4096, device="cuda"), torch.rand(4096, device="cuda")
    graphs("chain", chain, x, y)
    errors = []

    def work(seed):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            g = torch.Generator("cuda").manual_seed(seed)
            for _ in range(20):
                a, b = torch.rand(4096, device="cuda", generator=g), torch.rand(4096, device="cuda", generator=g)
                got = graphs("chain", chain, a, b)
                if not all(torch.equal(p, q) for p, q in zip(got, chain(a, b))):
                    errors.append(seed)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


@cuda
@pytest.mark.parametrize("params", [{}, {"target_kept": 0.6}, {"target_kept": 0.5, "gop": "keyint=8:bframes=2:ref=2"},
                                    {"target_kept": 0.6, "compile": True}])
def test_plans_on_the_gpu_equal_the_cpus_captured_or_not(params):
    """A decision is captured once its key repeats (a budget search's second decision, a
    second plan of the same shape) and replayed after - compiled first with ``compile`` -
    and every plan equals the CPU's."""
    from lipcodec import fixtures
    from lipcodec.video import pixel_proxy_latents, read_video

    latents = pixel_proxy_latents(read_video(fixtures.bundled_clip(), size=(128, 224), progress=False).frames)[None]
    params = dict(params)
    gop = params.pop("gop", None)
    on_cpu = lipcodec.plan(latents, "lipar", gop=gop, **params)
    for _ in range(3):
        on_gpu = lipcodec.plan(latents.cuda(), "lipar", gop=gop, **params)
        assert torch.equal(on_gpu.source.cpu(), on_cpu.source)
