/* test_memprov.c - the memory providers on a machine without the qwen3mm module: each fallback
 * forced in turn (hugetlb skipped when no huge pages are configured, THP when it is off), the
 * fallback order and its note, read-back of where pages landed, provider names and lists, and
 * argument errors.  The module path itself is tested in the VM (tests/kmod/). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "memprov.h"
#include "qwen3mm_uapi.h"

#define MiB (1ul << 20)
#define ONLY_HUGETLB (Q3_MEM_NO_ALL & ~Q3_MEM_NO_HUGETLB)
#define ONLY_THP (Q3_MEM_NO_ALL & ~Q3_MEM_NO_THP)
#define ONLY_PLAIN (Q3_MEM_NO_ALL & ~Q3_MEM_NO_PLAIN)

static long meminfo(const char *key)
{
	char line[256];
	long v = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	while (f && fgets(line, sizeof(line), f))
		if (!strncmp(line, key, strlen(key)) && line[strlen(key)] == ':')
			sscanf(line + strlen(key) + 1, "%ld", &v);
	if (f)
		fclose(f);
	return v;
}

static bool thp_off(void)
{
	char buf[128] = "";
	FILE *f = fopen("/sys/kernel/mm/transparent_hugepage/enabled", "r");

	if (!f)
		return true;
	if (!fgets(buf, sizeof(buf), f))
		buf[0] = 0;
	fclose(f);
	return strstr(buf, "[never]") != NULL;
}

/* The buffer is usable, zeroed, aligned to its page size, and every page is on one node. */
static void check_buffer(struct q3_membuf *b, size_t asked, enum q3_mem_provider want)
{
	struct q3_mem_placement pl;
	q3_err e = { "" };
	unsigned char *p = b->ptr;

	assert_int_equal(b->provider, want);
	assert_non_null(p);
	assert_true(b->len >= asked && b->len % b->page_size == 0);
	assert_int_equal((uintptr_t)p % b->page_size, 0);
	for (size_t i = 0; i < b->len; i += 4096)
		assert_int_equal(p[i], 0);
	memset(p, 0xa5, b->len);
	assert_int_equal(p[b->len - 1], 0xa5);
	assert_int_not_equal(b->fixed_io, 0); /* anonymous memory: accepted, or no io_uring here */

	assert_int_equal(q3_mem_nodes_of(b, &pl, &e), 0);
	assert_int_equal(pl.samples, b->len / b->page_size);
	assert_int_equal(pl.missing, 0);
	assert_int_equal(pl.nr_nodes, 1);
	assert_int_equal(pl.on_node[pl.main_node], pl.samples);
	if (b->node >= 0)
		assert_int_equal(pl.main_node, b->node);
}

static void test_plain_pages_on_node_0(void **state)
{
	struct q3_membuf b;
	q3_err e = { "" };

	assert_int_equal(q3_mem_alloc(MiB + 1, 0, ONLY_PLAIN, &b, &e), 0);
	assert_int_equal(b.page_size, (size_t)sysconf(_SC_PAGESIZE));
	assert_int_equal(b.len, MiB + b.page_size);
	assert_int_equal(b.node, 0);
	assert_string_equal(b.note, "");
	check_buffer(&b, MiB + 1, Q3_MEM_PLAIN);
	q3_mem_free(&b);
	assert_null(b.ptr);
	q3_mem_free(&b); /* twice is harmless */
}

static void test_plain_pages_strictly_bound_or_anywhere(void **state)
{
	struct q3_membuf b;
	q3_err e = { "" };

	assert_int_equal(q3_mem_alloc(3 * MiB, 0, ONLY_PLAIN | Q3_MEM_STRICT_NODE, &b, &e), 0);
	check_buffer(&b, 3 * MiB, Q3_MEM_PLAIN);
	q3_mem_free(&b);
	assert_int_equal(q3_mem_alloc(3 * MiB, -1, ONLY_PLAIN, &b, &e), 0);
	assert_int_equal(b.node, -1);
	check_buffer(&b, 3 * MiB, Q3_MEM_PLAIN);
	q3_mem_free(&b);
}

static void test_thp_gives_2mib_aligned_memory(void **state)
{
	struct q3_membuf b;
	q3_err e = { "" };
	int ret;

	if (thp_off())
		skip();
	ret = q3_mem_alloc(5 * MiB, 0, ONLY_THP, &b, &e);
	if (ret)
		fail_msg("thp: %s", e.msg);
	assert_int_equal(b.page_size, Q3_MEM_HUGE_PAGE);
	assert_int_equal(b.len, 6 * MiB);
	check_buffer(&b, 5 * MiB, Q3_MEM_THP);
	q3_mem_free(&b);
}

static void test_hugetlb_when_huge_pages_are_configured(void **state)
{
	struct q3_membuf b;
	q3_err e = { "" };
	int ret;

	if (meminfo("HugePages_Free") < 2 || meminfo("Hugepagesize") != 2048)
		skip();
	ret = q3_mem_alloc(3 * MiB, 0, ONLY_HUGETLB, &b, &e);
	if (ret)
		fail_msg("hugetlb: %s", e.msg);
	assert_int_equal(b.len, 4 * MiB);
	assert_true(b.locked);
	check_buffer(&b, 3 * MiB, Q3_MEM_HUGETLB);
	q3_mem_free(&b);
}

static void test_short_hugetlb_pool_falls_back_with_a_note(void **state)
{
	long free_pages = meminfo("HugePages_Free");
	size_t want = (size_t)(free_pages + 1) * Q3_MEM_HUGE_PAGE;
	enum q3_mem_provider next = thp_off() ? Q3_MEM_PLAIN : Q3_MEM_THP;
	struct q3_membuf b;
	q3_err e = { "" };

	if (free_pages < 0 || free_pages > 32)
		skip(); /* too many free huge pages to exhaust in a unit test */
	assert_int_equal(q3_mem_alloc(want, 0, Q3_MEM_NO_KMOD, &b, &e), 0);
	assert_int_equal(b.provider, next);
	assert_non_null(strstr(b.note, "hugetlb: no "));
	q3_mem_free(&b);
	/* hugetlb alone has nothing to fall back to */
	assert_int_equal(q3_mem_alloc(want, 0, ONLY_HUGETLB, &b, &e), -ENOMEM);
	assert_non_null(strstr(e.msg, "hugetlb:"));
	assert_null(b.ptr);
}

static void test_without_the_module_kmod_is_passed_over(void **state)
{
	struct q3_membuf b;
	struct stat st;
	q3_err e = { "" };

	if (!stat(QWEN3MM_DEVICE, &st))
		skip(); /* the module is loaded here */
	assert_int_equal(q3_mem_alloc(2 * MiB, 0, 0, &b, &e), 0);
	assert_int_not_equal(b.provider, Q3_MEM_KMOD);
	assert_non_null(strstr(b.note, "kmod: " QWEN3MM_DEVICE ": No such file"));
	check_buffer(&b, 2 * MiB, b.provider);
	q3_mem_free(&b);
	assert_int_equal(q3_mem_alloc(2 * MiB, 0, Q3_MEM_NO_ALL & ~Q3_MEM_NO_KMOD, &b, &e), -ENOMEM);
	assert_non_null(strstr(e.msg, "kmod: " QWEN3MM_DEVICE));
}

static void test_fixed_io_flag_keeps_anonymous_memory(void **state)
{
	struct q3_membuf b;
	q3_err e = { "" };

	assert_int_equal(q3_mem_alloc(MiB, 0, ONLY_PLAIN | Q3_MEM_FIXED_IO, &b, &e), 0);
	check_buffer(&b, MiB, Q3_MEM_PLAIN);
	q3_mem_free(&b);
}

static void test_children_do_not_inherit_the_memory(void **state)
{
	struct q3_membuf b;
	q3_err e = { "" };
	int status;
	pid_t pid;

	assert_int_equal(q3_mem_alloc(MiB, 0, ONLY_PLAIN, &b, &e), 0);
	pid = fork();
	if (!pid) {
		signal(SIGSEGV, SIG_DFL);
		*(volatile char *)b.ptr = 1;
		_exit(0);
	}
	assert_int_equal(waitpid(pid, &status, 0), pid);
	assert_true(WIFSIGNALED(status) && WTERMSIG(status) == SIGSEGV);
	q3_mem_free(&b);
}

static void test_bad_arguments(void **state)
{
	struct q3_membuf b;
	q3_err e = { "" };

	assert_int_equal(q3_mem_alloc(0, 0, 0, &b, &e), -EINVAL);
	assert_null(b.ptr);
	assert_int_equal(q3_mem_alloc(SIZE_MAX, 0, 0, &b, &e), -EINVAL);
	assert_int_equal(q3_mem_alloc(MiB, -2, 0, &b, &e), -EINVAL);
	assert_int_equal(q3_mem_alloc(MiB, 4096, 0, &b, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "node 4096"));
	assert_int_equal(q3_mem_alloc(MiB, 0, Q3_MEM_NO_ALL, &b, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "every provider is disabled"));
	{
		struct q3_mem_placement pl;
		struct q3_membuf none = { 0 };

		assert_int_equal(q3_mem_nodes_of(&none, &pl, &e), -EINVAL);
	}
}

static void test_provider_names_and_lists(void **state)
{
	unsigned flags;
	q3_err e = { "" };

	assert_string_equal(q3_mem_provider_name(Q3_MEM_KMOD), "kmod");
	assert_string_equal(q3_mem_provider_name(Q3_MEM_HUGETLB), "hugetlb");
	assert_string_equal(q3_mem_provider_name(Q3_MEM_THP), "thp");
	assert_string_equal(q3_mem_provider_name(Q3_MEM_PLAIN), "plain");
	assert_string_equal(q3_mem_provider_name(Q3_MEM_NR_PROVIDERS), "?");

	flags = 0;
	assert_int_equal(q3_mem_provider_parse("kmod,thp", &flags, &e), 0);
	assert_int_equal(flags, Q3_MEM_NO_HUGETLB | Q3_MEM_NO_PLAIN);
	flags = Q3_MEM_STRICT_NODE;
	assert_int_equal(q3_mem_provider_parse("plain", &flags, &e), 0);
	assert_int_equal(flags, Q3_MEM_STRICT_NODE | ONLY_PLAIN);
	flags = 0;
	assert_int_equal(q3_mem_provider_parse("auto", &flags, &e), 0);
	assert_int_equal(flags, 0);
	assert_int_equal(q3_mem_provider_parse("", &flags, &e), -EINVAL);
	assert_int_equal(q3_mem_provider_parse("kmod,", &flags, &e), -EINVAL);
	assert_int_equal(q3_mem_provider_parse(",kmod", &flags, &e), -EINVAL);
	assert_int_equal(q3_mem_provider_parse("kmod,,thp", &flags, &e), -EINVAL);
	assert_int_equal(q3_mem_provider_parse("kmodx", &flags, &e), -EINVAL);
	assert_int_equal(q3_mem_provider_parse("hugetlb,foo", &flags, &e), -EINVAL);
	assert_non_null(strstr(e.msg, "'foo'"));
	assert_int_equal(flags, 0); /* unchanged by the refusals */
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_plain_pages_on_node_0),
		cmocka_unit_test(test_plain_pages_strictly_bound_or_anywhere),
		cmocka_unit_test(test_thp_gives_2mib_aligned_memory),
		cmocka_unit_test(test_hugetlb_when_huge_pages_are_configured),
		cmocka_unit_test(test_short_hugetlb_pool_falls_back_with_a_note),
		cmocka_unit_test(test_without_the_module_kmod_is_passed_over),
		cmocka_unit_test(test_fixed_io_flag_keeps_anonymous_memory),
		cmocka_unit_test(test_children_do_not_inherit_the_memory),
		cmocka_unit_test(test_bad_arguments),
		cmocka_unit_test(test_provider_names_and_lists),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
