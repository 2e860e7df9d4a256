import collections
import json
import random

R = json.load(open("ranks.json"))


def tpr(data, tree, depth):
    tokens = rounds = 0
    for ranks in data:
        i = 0
        while i < len(ranks):
            path = ()
            a = 0
            for j in range(depth):
                if i + j + 1 > len(ranks) - 1:
                    break  # need a bonus token after
                path = path + (ranks[i + j],)
                if path in tree:
                    a += 1
                else:
                    break
            i += a + 1
            rounds += 1
        tokens += len(ranks)
    return tokens / rounds


def build(train, M, depth=8):
    cnt = collections.Counter()
    for ranks in train:
        for i in range(len(ranks)):
            path = ()
            for j in range(depth):
                if i + j >= len(ranks) or ranks[i + j] >= 16:
                    break
                path = path + (ranks[i + j],)
                cnt[path] += 1
    children = collections.defaultdict(list)
    for p in cnt:
        children[p[:-1]].append(p)
    tree = set()
    cand = set(children[()])
    while len(tree) < M and cand:
        best = max(cand, key=lambda p: (cnt[p], -len(p)))
        tree.add(best)
        cand.discard(best)
        cand |= set(children[best])
    return tree


for name in ("heldout", "validation"):
    data = R[name]
    random.seed(0)
    idx = list(range(len(data)))
    random.shuffle(idx)
    half = len(data) // 2
    A = [data[i] for i in idx[:half]]
    B = [data[i] for i in idx[half:]]
    print(name)
    for d in (1, 2, 3, 4, 5, 6):
        chain = {tuple([0] * k) for k in range(1, d + 1)}
        print(f"  chain d={d}: {tpr(data, chain, d):.3f}")
    for M in (2, 3, 4, 6, 8, 10, 12, 16, 24):
        t = build(A, M)
        depth = max(len(p) for p in t)
        widths = collections.Counter(len(p) for p in t)
        shape = [widths[k] for k in range(1, depth + 1)]
        print(f"  tree M={M} depth={depth} widths={shape}: B {tpr(B, t, 8):.3f} (A {tpr(A, t, 8):.3f})")
# tree built from validation, evaluated on heldout
t = build(R["validation"], 8)
print("val-built M=8 on heldout", tpr(R["heldout"], t, 8))
