"""One-off: where the recipe's ~0.2 s goes on a GPU (random ResNet-18, random images)."""
import json, statistics, sys, time, torch
sys.path.insert(0, ".")
from clipguard.data import ImageData, iter_batches
from clipguard.defenses.clipping import clipped_model, compute_statistics
from clipguard.models import resolve_spec
from clipguard.purify import bounds_sample
dev = torch.device("cuda")
spec = resolve_spec("resnet18")
cpu_model = spec.build().eval()
g = torch.Generator().manual_seed(0)
train = ImageData(torch.randint(0, 256, (50000, 3, 32, 32), dtype=torch.uint8, generator=g),
                  torch.randint(0, 10, (50000,), generator=g), tuple(str(i) for i in range(10)), "rand")
def t(fn, n=5):
    out = []
    for _ in range(n):
        torch.cuda.synchronize(); s = time.perf_counter(); fn(); torch.cuda.synchronize(); out.append(time.perf_counter() - s)
    return round(statistics.median(out) * 1000, 2)
res = {}
net = cpu_model.to(dev)
res["to_cuda_ms"] = t(lambda: cpu_model.cpu().to(dev))
res["bounds_sample_ms"] = t(lambda: bounds_sample(train, 5000))
sampled = bounds_sample(train, 5000)
for bs in (256, 512, 1024, 2500):
    res[f"stats_bs{bs}_ms"] = t(lambda bs=bs: compute_statistics(net, lambda: iter_batches(sampled, bs, spec.mean, spec.std, dev), granularity="channel"))
stats = compute_statistics(net, lambda: iter_batches(sampled, 256, spec.mean, spec.std, dev), granularity="channel")
res["bounds_ms"] = t(lambda: stats.bounds(4.0))
b = stats.bounds(4.0)
res["clipped_model_ms"] = t(lambda: clipped_model(net, b))
cm = clipped_model(net, b)
res["clipped_cpu_ms"] = t(lambda: clipped_model(net, b).cpu())
def plain():
    with torch.no_grad():
        for x, _ in iter_batches(sampled, 256, spec.mean, spec.std, dev):
            net(x)
net.to(dev); print(json.dumps(res), flush=True)
res["plain_forward_5000_bs256_ms"] = t(plain)
def whole():
    m = cpu_model.to(dev).eval(); s = bounds_sample(train, 5000)
    st = compute_statistics(m, lambda: iter_batches(s, 256, spec.mean, spec.std, dev), granularity="channel")
    clipped_model(m, st.bounds(4.0)).cpu().eval()
res["whole_recipe_ms"] = t(whole)
print(json.dumps(res, indent=1))
