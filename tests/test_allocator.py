"""The allocator settings jpeft runs under respect the user's: their malloc choices win, their other glibc
tunables are kept beside ours."""
from jpeft import allocator

RTLD = "glibc.rtld.optional_static_tls=2048"


def test_other_glibc_tunables_are_kept_beside_ours():
    env = {"GLIBC_TUNABLES": f"{RTLD}:glibc.malloc.arena_test=4"}
    tuned = allocator.tuned(env)
    assert tuned["GLIBC_TUNABLES"] == f"{RTLD}:{allocator.MALLOC_ENV['GLIBC_TUNABLES']}"
    assert {k: v for k, v in tuned.items() if k != "GLIBC_TUNABLES"} == {
        k: v for k, v in allocator.MALLOC_ENV.items() if k != "GLIBC_TUNABLES"}
    assert allocator.tuned({}) == allocator.MALLOC_ENV


def test_only_a_malloc_choice_counts_as_the_users_own():
    assert not allocator.user_tuned({"GLIBC_TUNABLES": RTLD, "PATH": "/bin"})
    assert allocator.user_tuned({"GLIBC_TUNABLES": f"{RTLD}:glibc.malloc.hugetlb=0"})
    assert allocator.user_tuned({"MALLOC_ARENA_MAX": "4"})
    # After the console script's re-exec the environment holds ours: it never re-executes twice.
    assert allocator.user_tuned({**{"GLIBC_TUNABLES": RTLD}, **allocator.tuned({"GLIBC_TUNABLES": RTLD})})
