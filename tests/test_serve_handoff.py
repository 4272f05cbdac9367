"""The engine thread's hand-off to the event loop (`serve.handoff`): answers and stream
pieces arrive in the order they were produced, a burst wakes the loop once, and a
cancelled wait drops the request it waited for."""

import asyncio
import threading
from concurrent.futures import Future

import pytest

from softprompt.serve.handoff import Mailbox, Pieces

from test_serve_isolation import causal_bank  # noqa: F401 (the fixture, found by pytest by its name)


def test_a_burst_from_another_thread_wakes_the_loop_once_and_keeps_its_order():
    async def main():
        loop = asyncio.get_running_loop()
        wakes = []
        real = loop.call_soon_threadsafe
        loop.call_soon_threadsafe = lambda *a, **k: (wakes.append(a), real(*a, **k))[1]
        mailbox, pieces, seen = Mailbox(loop), Pieces(loop), []
        thread = threading.Thread(target=lambda: [mailbox.post(pieces.put, i) for i in range(100)]
                                  + [mailbox.post(pieces.close)])
        thread.start()
        thread.join()  # the whole burst is queued before the loop runs again
        while taken := await pieces.take():
            seen.extend(taken)
        return wakes, seen

    wakes, seen = asyncio.run(main())
    assert seen == list(range(100))
    assert len(wakes) == 1


def test_pieces_are_taken_whole_and_take_ends_once_closed_and_drained():
    async def main():
        loop = asyncio.get_running_loop()
        pieces = Pieces(loop)
        waiting = asyncio.ensure_future(pieces.take())
        await asyncio.sleep(0)
        assert not waiting.done()  # nothing there: it waits
        pieces.put("a")
        pieces.put("b")
        first = await waiting
        pieces.put("c")
        pieces.close()
        return first, await pieces.take(), await pieces.take()

    assert asyncio.run(main()) == (["a", "b"], ["c"], [])


def test_an_answer_reaches_the_loop_with_its_value_or_its_exception():
    async def main():
        mailbox = Mailbox(asyncio.get_running_loop())
        ok, bad = Future(), Future()
        waits = mailbox.future(ok), mailbox.future(bad)
        threading.Thread(target=lambda: (ok.set_result(7), bad.set_exception(KeyError("x")))).start()
        return await waits[0], await asyncio.gather(waits[1], return_exceptions=True)

    value, (error,) = asyncio.run(main())
    assert value == 7 and isinstance(error, KeyError)


def test_cancelling_the_wait_cancels_the_request_not_yet_run():
    async def main():
        mailbox = Mailbox(asyncio.get_running_loop())
        done = Future()
        waiting = mailbox.future(done)
        waiting.cancel()
        await asyncio.sleep(0)
        return done

    done = asyncio.run(main())
    assert done.cancelled()
    assert not done.set_running_or_notify_cancel()  # the batcher's worker skips it


def test_an_answer_after_the_wait_was_cancelled_is_dropped():
    async def main():
        mailbox = Mailbox(asyncio.get_running_loop())
        done = Future()
        assert done.set_running_or_notify_cancel()  # already running: cancel() cannot stop it
        waiting = mailbox.future(done)
        waiting.cancel()
        done.set_result(1)
        await asyncio.sleep(0.01)
        return waiting

    assert asyncio.run(main()).cancelled()


if __name__ == "__main__":
    pytest.main([__file__])


def test_take_at_least_waits_for_that_many_pieces_or_the_close():
    async def main():
        pieces = Pieces(asyncio.get_running_loop())
        waiting = asyncio.ensure_future(pieces.take(at_least=3))
        pieces.put(1)
        pieces.put(2)
        await asyncio.sleep(0)
        assert not waiting.done()  # two of three: still waiting
        pieces.put(3)
        first = await waiting
        pieces.put(4)
        rest = asyncio.ensure_future(pieces.take(at_least=3))
        await asyncio.sleep(0)
        assert not rest.done()
        pieces.close()  # the stream ends: what is there goes out
        return first, await rest

    assert asyncio.run(main()) == ([1, 2, 3], [4])


def test_a_stream_interval_sends_the_same_events(causal_bank):
    """`create_app(stream_interval=4)`: the same pieces, one SSE event each, as with 1."""
    import httpx

    from softprompt.serve import create_app
    from serving import Server

    body = {"model": "writer", "prompt": "once upon a time", "max_tokens": 12, "temperature": 0, "stream": True}
    events = {}
    for interval in (1, 4):
        with Server(create_app(causal_bank, stream_interval=interval)) as server:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60) as r:
                events[interval] = [line for line in r.iter_lines() if line.startswith("data: ")]
    strip = lambda lines: [__import__("re").sub(r'"(id|created)": [^,]+,', "", x) for x in lines]  # noqa: E731
    assert strip(events[4]) == strip(events[1]) and len(events[1]) > 5


def test_a_stream_interval_below_one_is_refused(causal_bank):
    from softprompt.errors import ConfigError
    from softprompt.serve import create_app

    with pytest.raises(ConfigError, match="stream_interval must be a whole number of tokens, 1 or more; got 0"):
        create_app(causal_bank, stream_interval=0)
