"""The slots of a speech service (`web.speech.Slots`): who gets one, who waits, who is told
"no free channels"."""

import asyncio

from moshi_mlx.web.speech import Slots

UNMUTE_START_SECONDS = 0.5  # Unmute's wait from connecting to Ready or Error (find_instance)


def test_a_client_waits_for_a_slot_being_given_back_not_for_a_held_one():
    async def scenario():
        slots = Slots(2)
        assert [await slots.take(), await slots.take()] == [0, 1]
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await slots.take(wait_seconds=5) is None  # both held: no wait at all
        assert loop.time() - start < 1
        slots.leaving(1)  # its client left; its Mimi is being prepared
        waiting = asyncio.create_task(slots.take(wait_seconds=5))
        await asyncio.sleep(0.2)
        assert not waiting.done() and slots.used == 2
        slots.give_back(1)
        assert await waiting == 1
        slots.leaving(0)
        assert await slots.take(wait_seconds=0.3) is None  # never given back: the wait ends
        slots.give_back(0)
        assert await slots.take() == 0

    asyncio.run(scenario())


def test_every_slot_held_is_told_before_unmute_gives_up():
    """Every slot held: "no free channels" comes within Unmute's 0.5 s (then Unmute says the
    service is at capacity, as with Kyutai's server; later, it says the service timed out)."""

    async def scenario():
        slots = Slots(1)
        assert await slots.take() == 0
        loop = asyncio.get_running_loop()
        start = loop.time()
        assert await slots.take() is None
        assert loop.time() - start < UNMUTE_START_SECONDS / 2

    asyncio.run(scenario())
