"""Worker processes compute the same bits on every thread (a call may be served by any of them)."""

import subprocess
import sys

from fedsplit.hosting.processes import _worker_env

# A product whose MKL blocking depends on the calling thread's OpenMP thread count.
PROBE = """
import threading, torch
torch.set_num_threads(1)
torch.manual_seed(0)
x, w = torch.randn(9, 64), torch.randn(64, 64)
main = torch.nn.functional.linear(x, w)
other = []
t = threading.Thread(target=lambda: other.append(torch.nn.functional.linear(x, w)))
t.start(); t.join()
print(torch.equal(main, other[0]))
"""


def test_a_worker_process_computes_the_same_product_on_its_main_thread_and_on_a_new_one():
    out = subprocess.run([sys.executable, "-c", PROBE], env=_worker_env(), capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
