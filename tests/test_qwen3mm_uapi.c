/* test_qwen3mm_uapi.c - the qwen3mm ioctl ABI is frozen: struct sizes and field offsets, ioctl
 * numbers as released, sizes that are multiples of 8 (same layout for 32-bit callers).  A change
 * here means a new _V2 ioctl is needed instead (see kmod/qwen3mm_uapi.h). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "qwen3mm_uapi.h"

static void test_struct_layouts_are_as_released(void **state)
{
	assert_int_equal(sizeof(struct qwen3mm_version), 24);
	assert_int_equal(offsetof(struct qwen3mm_version, max_buffer_size), 8);
	assert_int_equal(offsetof(struct qwen3mm_version, debug), 20);

	assert_int_equal(sizeof(struct qwen3mm_alloc), 48);
	assert_int_equal(offsetof(struct qwen3mm_alloc, node), 8);
	assert_int_equal(offsetof(struct qwen3mm_alloc, flags), 12);
	assert_int_equal(offsetof(struct qwen3mm_alloc, handle), 16);
	assert_int_equal(offsetof(struct qwen3mm_alloc, mmap_offset), 24);
	assert_int_equal(offsetof(struct qwen3mm_alloc, alloc_size), 32);
	assert_int_equal(offsetof(struct qwen3mm_alloc, alloc_node), 40);

	assert_int_equal(sizeof(struct qwen3mm_query), 32);
	assert_int_equal(offsetof(struct qwen3mm_query, node), 24);
	assert_int_equal(offsetof(struct qwen3mm_query, map_count), 28);

	assert_int_equal(sizeof(struct qwen3mm_free), 8);

	assert_int_equal(sizeof(struct qwen3mm_node_info), 40);
	assert_int_equal(offsetof(struct qwen3mm_node_info, total_bytes), 8);
	assert_int_equal(offsetof(struct qwen3mm_node_info, held_bytes), 32);

	assert_int_equal(sizeof(struct qwen3mm_debug_pin), 32);
	assert_int_equal(offsetof(struct qwen3mm_debug_pin, flags), 16);
	assert_int_equal(offsetof(struct qwen3mm_debug_pin, pinned), 24);
}

static void test_ioctl_numbers_are_as_released(void **state)
{
	assert_int_equal(QWEN3MM_IOC_GET_VERSION, 0x8018B700u);
	assert_int_equal(QWEN3MM_IOC_ALLOC, 0xC030B701u);
	assert_int_equal(QWEN3MM_IOC_QUERY, 0xC020B702u);
	assert_int_equal(QWEN3MM_IOC_FREE, 0x4008B703u);
	assert_int_equal(QWEN3MM_IOC_NODE_INFO, 0xC028B704u);
	assert_int_equal(QWEN3MM_IOC_DEBUG_PIN, 0xC020B740u);
	assert_int_equal(QWEN3MM_IOC_DEBUG_UNPIN, 0x0000B741u);
}

static void test_constants_are_as_released(void **state)
{
	assert_int_equal(QWEN3MM_VERSION_MAJOR, 1);
	assert_int_equal(QWEN3MM_CHUNK_SIZE, 2u << 20);
	assert_int_equal(QWEN3MM_MAX_BUFFER_SIZE, 1ull << 40);
	assert_int_equal(QWEN3MM_NODE_ANY, 0xffffffffu);
	assert_int_equal(QWEN3MM_ALLOC_EXACT_NODE, 1);
	assert_int_equal(QWEN3MM_PIN_WRITE | QWEN3MM_PIN_LONGTERM, 3);
	/* a buffer's mmap offset must stay a valid off_t for every handle */
	assert_true((uint64_t)QWEN3MM_MAX_HANDLE << QWEN3MM_MMAP_SHIFT < (1ull << 63));
}

int main(void)
{
	const struct CMUnitTest tests[] = {
		cmocka_unit_test(test_struct_layouts_are_as_released),
		cmocka_unit_test(test_ioctl_numbers_are_as_released),
		cmocka_unit_test(test_constants_are_as_released),
	};
	return cmocka_run_group_tests(tests, NULL, NULL);
}
