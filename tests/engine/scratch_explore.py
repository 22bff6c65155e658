import asyncio, time
from qubrid_lab.engine.base import GenerationRun, Finish, Delta, Failure
from qubrid_lab.engine.sampling import SamplingParams

async def gen(engine, prompts, params, n=1):
    run = GenerationRun(engine, prompts, params, n)
    evs = [e async for e in run.events()]
    for _ in range(100):
        await asyncio.sleep(0.01)
        if engine.active_sequences == 0: break
    await asyncio.sleep(0.1)
    extra = []
    while not run.queue.empty(): extra.append(run.queue.get_nowait())
    return evs, extra

def test_x(chat_engine, tiny_tokenizer):
    e = chat_engine
    p = e.encode_chat([{"role": "user", "content": "Hello"}])
    print(asyncio.run(gen(e, [p], SamplingParams(temperature=0, max_tokens=1))))
    print(asyncio.run(gen(e, [p], SamplingParams(temperature=0, max_tokens=1), n=2)))
    print(asyncio.run(gen(e, [[]], SamplingParams(temperature=0, max_tokens=3))))
    print(asyncio.run(gen(e, [[5]*255], SamplingParams(temperature=0))))
