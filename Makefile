# qwen3d: the one entry point.  `make help` lists the targets.
#
# Layout of the build (everything under build/):
#   build/libqwen3d.a      userspace/*.c kernels/*.c tools/*.c (all but userspace/main.c)
#   build/libqwen3d_cuda.a kernels/*.cu (only where nvcc exists)
#   build/qwen3d           the CLI and daemon
#   build/tests/test_*     one cmocka program per tests/test_*.c
#   build/tests/gpu/*      GPU test programs (tests/gpu/*.c, *.cu), run by `make test-gpu`
#   build/fuzz/*           libFuzzer targets (tests/fuzz/fuzz_*.c), built with clang
#
# Files named *_avx2.c, *_avx512.c and *_amx.c get the matching -m flags; the code that calls
# them checks the CPU at run time, so the binary runs on any x86-64.

BUILD    ?= build
CC       ?= gcc
CLANG    ?= clang
CUDA_HOME ?= $(firstword $(wildcard /usr/local/cuda /usr/lib/cuda))
NVCC     ?= $(firstword $(shell command -v nvcc 2>/dev/null) $(wildcard $(CUDA_HOME)/bin/nvcc))
KDIR     ?= /lib/modules/$(shell uname -r)/build
FUZZ_TIME ?= 60
# sm_86 (RTX 30xx), sm_89 (RTX 4090), sm_90 (H100/H200), plus PTX for anything newer
CUDA_ARCH ?= -gencode arch=compute_86,code=sm_86 -gencode arch=compute_89,code=sm_89 \
             -gencode arch=compute_90,code=sm_90 -gencode arch=compute_90,code=compute_90

WARN     := -Wall -Wextra -Wno-unused-parameter -Wno-sign-compare -Wshadow=local -Wno-format-truncation
CPPFLAGS += -D_GNU_SOURCE -Iuserspace -Ikernels -Ikmod
CFLAGS   ?= -O2 -g
# override: `make CFLAGS=...` (test-asan does) must add to these flags, not drop them
override CFLAGS += -std=gnu11 -pthread -fno-strict-aliasing -MMD -MP $(WARN)
ifneq ($(SAN),)
override CFLAGS += -fsanitize=$(SAN) -fno-omit-frame-pointer
override LDFLAGS += -fsanitize=$(SAN)
endif
ifneq ($(WERROR),)
override CFLAGS += -Werror
endif

# liburing, libutf8proc and libmicrohttpd are linked statically so that one binary built on
# Debian runs on machines that lack them (the GPU test machine does); the rest are everywhere.
LIBS     := -Wl,-Bstatic -luring -lutf8proc -lmicrohttpd -Wl,-Bdynamic -lgnutls \
            -ljansson -lpcre2-8 -lhwloc -lnuma -lm -ldl -lpthread

LIB_SRC  := $(filter-out userspace/main.c,$(wildcard userspace/*.c kernels/*.c tools/*.c))
LIB_OBJ  := $(LIB_SRC:%.c=$(BUILD)/%.o)
TEST_SRC := $(wildcard tests/test_*.c)
TEST_BIN := $(TEST_SRC:tests/%.c=$(BUILD)/tests/%)
FUZZ_SRC := $(wildcard tests/fuzz/fuzz_*.c)

ifneq ($(NVCC),)
HAVE_CUDA := 1
CU_SRC   := $(wildcard kernels/*.cu)
CU_OBJ   := $(CU_SRC:%.cu=$(BUILD)/%.cu.o)
GPU_TEST_SRC := $(wildcard tests/gpu/*.c tests/gpu/*.cu)
GPU_TEST_BIN := $(patsubst tests/gpu/%,$(BUILD)/tests/gpu/%,$(basename $(GPU_TEST_SRC)))
# the wide matvec multicasts its rows over a cluster on sm_90 (H100/H200: q3g_mmv launches it
# there only), which ptxas advises against for the PTX newer GPUs compile from: quiet, where known
PTXAS_MC := $(shell $(dir $(NVCC))ptxas --help 2>/dev/null | grep -q suppress-async-bulk-multicast && \
              echo -Xptxas -suppress-async-bulk-multicast-advisory-warning)
NVFLAGS  := -O3 -g -lineinfo -std=c++17 $(CUDA_ARCH) -Iuserspace -Ikernels -Ikmod \
            -Xcompiler -fno-strict-aliasing,-Wall -MMD -MP $(PTXAS_MC)
CUDA_LIBS := -L$(CUDA_HOME)/lib64 -Wl,-rpath,$(CUDA_HOME)/lib64 -lcudart_static -lcublas -lcublasLt -lrt -lstdc++
CPPFLAGS += -DHAVE_CUDA=1
# -u: pull the CUDA backend out of its archive (engine.c refers to it weakly, backend.h); a group:
# C code calls the CUDA library and the CUDA library calls C helpers (q3_errf, the CPU experts)
MAIN_LIBS := -Wl,-u,q3_backend_cuda -Wl,--start-group $(BUILD)/libqwen3d_cuda.a $(BUILD)/libqwen3d.a \
	     -Wl,--end-group $(CUDA_LIBS)
else
MAIN_LIBS := $(BUILD)/libqwen3d.a
endif

.PHONY: all cpu gpu kmod test test-unit test-cli test-asan test-kmod test-gpu test-api bench fuzz \
        fuzz-build fuzz-lib lib deps demo install clean help format

all: $(BUILD)/qwen3d

help:
	@echo "make            build build/qwen3d (CPU backend; CUDA backend too where nvcc exists)"
	@echo "make demo       build, write a tiny random-weight model with the real tokenizer, serve it"
	@echo "make test       every CPU test: unit, fixture parity, CLI, ASan, fuzz smoke, kmod VM, API"
	@echo "make test-unit  the cmocka programs only"
	@echo "make gpu        the CUDA library and GPU test programs (needs nvcc)"
	@echo "make test-gpu   GPU tests (needs a GPU)"
	@echo "make kmod       the qwen3mm module against KDIR (default: running kernel)"
	@echo "make test-kmod  build the module for Debian's 6.1 and 6.12 kernels and test it under qemu"
	@echo "make bench      benchmarks (see tools/bench.sh)"
	@echo "make fuzz       run every fuzz target FUZZ_TIME seconds (default 60)"
	@echo "make install    qwen3d to PREFIX/bin (/usr/local), the udev rule, knob defaults, systemd unit"
	@echo "make deps       install the Debian packages the build and tests need (root)"
	@echo "make clean      remove build/"

$(BUILD)/%.o: %.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -c $< -o $@

$(BUILD)/%_avx2.o: %_avx2.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -mavx2 -mfma -mf16c -c $< -o $@

$(BUILD)/%_avx512.o: %_avx512.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq \
	      -mavx512vnni -mavx512bf16 -c $< -o $@

$(BUILD)/%_amx.o: %_amx.c
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -mavx2 -mfma -mf16c -mavx512f -mavx512bw -mavx512vl -mavx512dq \
	      -mavx512vnni -mavx512bf16 -mamx-tile -mamx-int8 -mamx-bf16 -c $< -o $@

$(BUILD)/libqwen3d.a: $(LIB_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/qwen3d: $(BUILD)/userspace/main.o $(BUILD)/libqwen3d.a $(if $(HAVE_CUDA),$(BUILD)/libqwen3d_cuda.a)
	$(CC) $(LDFLAGS) -o $@ $(BUILD)/userspace/main.o $(MAIN_LIBS) $(LIBS)

cpu: $(BUILD)/libqwen3d.a
	$(MAKE) NVCC= $(BUILD)/qwen3d

# ---- CUDA ------------------------------------------------------------------------------------
ifneq ($(HAVE_CUDA),)
$(BUILD)/%.cu.o: %.cu
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -DHAVE_CUDA=1 -c $< -o $@

$(BUILD)/libqwen3d_cuda.a: $(CU_OBJ)
	@rm -f $@
	ar rcs $@ $^

$(BUILD)/tests/gpu/%: tests/gpu/%.cu $(BUILD)/libqwen3d_cuda.a $(BUILD)/libqwen3d.a
	@mkdir -p $(dir $@)
	$(NVCC) $(NVFLAGS) -DHAVE_CUDA=1 -Itests -o $@ $< $(BUILD)/libqwen3d_cuda.a $(BUILD)/libqwen3d.a \
	    -Xlinker -Bstatic -luring -lutf8proc -lmicrohttpd -Xlinker -Bdynamic -lgnutls -ljansson -lpcre2-8 \
	    -lhwloc -lnuma -lm -ldl -lpthread -lcublas -lcublasLt

$(BUILD)/tests/gpu/%: tests/gpu/%.c $(BUILD)/libqwen3d_cuda.a $(BUILD)/libqwen3d.a
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) -DHAVE_CUDA=1 $(CFLAGS) -Itests -o $@ $< $(MAIN_LIBS) $(LIBS)

gpu: $(BUILD)/qwen3d $(GPU_TEST_BIN)

test-gpu: gpu
	bash tests/gpu/run.sh $(BUILD)
else
gpu test-gpu:
	@echo "nvcc not found (set NVCC= or CUDA_HOME=): skipping the CUDA backend and GPU tests"
endif

# ---- tests -----------------------------------------------------------------------------------
$(BUILD)/tests/%: tests/%.c $(BUILD)/libqwen3d.a $(if $(HAVE_CUDA),$(BUILD)/libqwen3d_cuda.a)
	@mkdir -p $(dir $@)
	$(CC) $(CPPFLAGS) $(CFLAGS) -Itests -o $@ $< $(MAIN_LIBS) -lcmocka $(LIBS) $(LDFLAGS)

test-unit: $(TEST_BIN) $(BUILD)/qwen3d
	bash tests/run.sh $(BUILD) unit

test-cli: $(BUILD)/qwen3d
	bash tests/run.sh $(BUILD) cli

# The unit tests and the CLI error cases again under AddressSanitizer + UBSan, in build-asan/.
test-asan:
	$(MAKE) BUILD=build-asan SAN=address,undefined NVCC= CFLAGS="-O1 -g" \
	    build-asan/qwen3d $(patsubst $(BUILD)/%,build-asan/%,$(TEST_BIN))
	ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 \
	    bash tests/run.sh build-asan unit cli

test-api: $(BUILD)/qwen3d
	bash tests/api/run.sh $(BUILD)

demo: $(BUILD)/qwen3d
	bash tools/demo.sh $(BUILD)

# The paths udev/60-qwen3mm.rules and udev/qwen3d.service name; /etc/qwen3mm.conf is kept if it
# exists.  The module itself: kmod/dkms.conf.
PREFIX ?= /usr/local
install: $(BUILD)/qwen3d
	install -D -m 755 $(BUILD)/qwen3d $(DESTDIR)$(PREFIX)/bin/qwen3d
	install -D -m 644 udev/60-qwen3mm.rules $(DESTDIR)/etc/udev/rules.d/60-qwen3mm.rules
	install -D -m 755 udev/qwen3mm-knobs $(DESTDIR)/usr/local/lib/qwen3mm/qwen3mm-knobs
	[ -e $(DESTDIR)/etc/qwen3mm.conf ] || install -D -m 644 udev/qwen3mm.conf $(DESTDIR)/etc/qwen3mm.conf
	install -D -m 644 udev/qwen3d.service $(DESTDIR)/etc/systemd/system/qwen3d.service
	install -D -m 644 README.md $(DESTDIR)/usr/share/doc/qwen3d/README.md
	@echo "installed; as root: groupadd --system qwen3; udevadm control --reload; systemctl daemon-reload"

test-kmod:
	bash tests/kmod/run.sh

test: all $(TEST_BIN)
	bash tests/run.sh $(BUILD) unit cli
	$(MAKE) test-asan
	$(MAKE) fuzz FUZZ_TIME=$(or $(CI_FUZZ_TIME),20)
	$(MAKE) test-kmod
	$(MAKE) test-api

# ---- fuzzing (libFuzzer: the library is rebuilt with clang + ASan + UBSan in build-fuzz/) -----
FUZZ_BIN := $(FUZZ_SRC:tests/fuzz/%.c=build-fuzz/fuzz/%)

build-fuzz/fuzz/%: tests/fuzz/%.c fuzz-lib
	@mkdir -p $(dir $@)
	$(CLANG) $(filter-out -DHAVE_CUDA=1,$(CPPFLAGS)) -DFUZZING -std=gnu11 -g -O1 -fsanitize=fuzzer,address,undefined -Itests \
	    -o $@ $< build-fuzz/libqwen3d.a $(LIBS)

fuzz-lib:
	$(MAKE) BUILD=build-fuzz CC=$(CLANG) SAN=address,undefined NVCC= WARN= \
	    CFLAGS="-O1 -g -fsanitize=fuzzer-no-link -DFUZZING" lib

lib: $(BUILD)/libqwen3d.a

fuzz-build: $(FUZZ_BIN)

fuzz: fuzz-build
	bash tests/fuzz/run.sh build-fuzz $(FUZZ_TIME)

# ---- kernel module ---------------------------------------------------------------------------
kmod:
	$(MAKE) -C $(KDIR) M=$(CURDIR)/kmod modules

bench: all
	bash tools/bench.sh $(BUILD)

deps:
	bash tools/deps.sh

format:
	clang-format -i userspace/*.[ch] kernels/*.[ch] kernels/*.cu kernels/*.cuh tests/*.c 2>/dev/null || true

clean:
	rm -rf $(BUILD) build-asan build-fuzz
	-$(MAKE) -C kmod clean 2>/dev/null

-include $(shell find $(BUILD) -name '*.d' 2>/dev/null)
