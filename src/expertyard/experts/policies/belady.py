from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable

from expertyard.experts.policies.base import CachePolicy, ExpertKey, Param

NEVER = 1 << 62  # next use of an expert that is not used again


class BeladyPolicy(CachePolicy):
    """The offline optimum (Belady's MIN): evict the expert whose next use is farthest in the future.

    Built from the whole sequence of visits (visit index -> (layer, experts it uses)), so it is a bound for
    simulation, not a policy an engine can run. With demand loading it never misses more than any other policy
    on the same visits and capacity. `now` must be the visit index of that sequence.
    """

    name = "belady"
    params = (Param("future", "every visit in order: (layer, experts it uses); the simulator passes it", kind=list),)
    online = False

    def __init__(self, future: Iterable[tuple[int, Iterable[int]]]):
        uses: dict[ExpertKey, array] = {}  # key -> sorted visit indices where it is used
        for visit, (layer, experts) in enumerate(future):
            for e in experts:
                key = (layer, e)
                if key not in uses:
                    uses[key] = array("q")
                if not uses[key] or uses[key][-1] != visit:
                    uses[key].append(visit)
        self.uses = uses
        self.next_use: dict[ExpertKey, int] = {}  # resident key -> visit of its next use (NEVER if none)

    def _next(self, key: ExpertKey, after: int, inclusive: bool) -> int:
        uses = self.uses.get(key)
        if uses is None:
            return NEVER
        i = (bisect_left if inclusive else bisect_right)(uses, after)
        return uses[i] if i < len(uses) else NEVER

    def on_access(self, key: ExpertKey, now: int) -> None:
        self.next_use[key] = self._next(key, now, inclusive=False)

    def on_insert(self, key: ExpertKey, now: int) -> None:
        # a prefetch may load an expert before this visit uses it: a use at `now` itself still counts
        self.next_use[key] = self._next(key, now, inclusive=True)

    def on_evict(self, key: ExpertKey) -> None:
        self.next_use.pop(key, None)

    def victim(self, candidates: Iterable[ExpertKey], now: int) -> ExpertKey:
        # next uses are refreshed on every access, so each is still >= now: the farthest is the optimal victim
        return max(candidates, key=self.next_use.__getitem__)
