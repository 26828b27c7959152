# dimoo: `make` builds lib/libdimoo.so and bin/dimoo; `make test` runs the C++
# tests (CTest) and the Go tests; `make bench` runs the benchmarks.
BUILD     ?= build
CMAKE_ARGS ?=
GO        ?= go
JOBS      ?= $(shell nproc 2>/dev/null || echo 2)
# CUDA backend: AUTO (when a CUDA compiler is found), ON or OFF. A toolkit
# installed from wheels by scripts/install-cuda-wheels.sh into .cuda/ is used
# when no CUDACXX is set.
DIMOO_CUDA ?= AUTO
WHEEL_CUDA := $(CURDIR)/.cuda/py/nvidia/cu13
ifeq ($(origin CUDACXX),undefined)
  ifneq ($(wildcard $(WHEEL_CUDA)/bin/nvcc),)
    export CUDACXX := $(WHEEL_CUDA)/bin/nvcc
    CMAKE_ARGS += -DCUDAToolkit_ROOT=$(WHEEL_CUDA)
  endif
endif

.PHONY: all lib cli test test-cpp test-go test-emu test-emu-asan test-san bench-emu bench fuzz clean testdata

all: lib cli

$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja -DDIMOO_CUDA=$(DIMOO_CUDA) $(CMAKE_ARGS)

lib: $(BUILD)/build.ninja
	cmake --build $(BUILD) -j $(JOBS)

cli: lib
	$(GO) build -o bin/dimoo ./cmd/dimoo

test: all test-cpp test-go

test-cpp: lib
	ctest --test-dir $(BUILD) --output-on-failure -j $(JOBS)

test-go: lib
	$(GO) vet ./...
	$(GO) test -count=1 ./...

# The CUDA backend's own code (kernels/cuda) run on the host through the
# emulated CUDA of csrc/tests/emu: every CUDA test, on a machine without a GPU,
# with the threads between barriers in order and in reverse (a race shows as
# a difference), and the attention kernels on an emulated sm_90 (wgmma) and
# sm_86 (99 KB of shared memory). A separate CPU-only build; nothing here says the code runs
# on a GPU.
EMU_BUILD ?= build-emu
EMU_TESTS ?= Cuda*:Estimate.*:KeptCtx.*:Library.*
test-emu:
	cmake -S . -B $(EMU_BUILD) -G Ninja -DDIMOO_CUDA=OFF -DDIMOO_CUDA_EMU=ON $(CMAKE_ARGS) >/dev/null
	cmake --build $(EMU_BUILD) --target dimoo_tests -j $(JOBS)
	./$(EMU_BUILD)/dimoo_tests --gtest_brief=1 --gtest_filter='$(EMU_TESTS)'
	DIMOO_EMU_SCHEDULE=reverse ./$(EMU_BUILD)/dimoo_tests --gtest_brief=1 --gtest_filter='$(EMU_TESTS)'
	DIMOO_EMU_SM=90 ./$(EMU_BUILD)/dimoo_tests --gtest_brief=1 --gtest_filter='CudaKernels.Attention*'
	# The sm_90a kernels again with the threads in reverse order (a missing wait shows),
	# on three emulated SMs (a persistent grid's CTAs loop over tiles, and the TMA
	# producer runs ahead of its consumers).
	DIMOO_EMU_SM=90 DIMOO_EMU_SMS=3 DIMOO_EMU_SCHEDULE=reverse ./$(EMU_BUILD)/dimoo_tests --gtest_brief=1 \
	  --gtest_filter='CudaKernels.AttentionSm90*'
	DIMOO_EMU_SM=86 ./$(EMU_BUILD)/dimoo_tests --gtest_brief=1 --gtest_filter='CudaKernels.Attention*'
	for a in sm90 sm90p sm90p2 sm90w sm90t sm90tp sm90ts sm90tps sm90tw; do DIMOO_EMU_SM=90 DIMOO_CUDA_ATTN=$$a ./$(EMU_BUILD)/dimoo_tests --gtest_brief=1 \
	  --gtest_filter='CudaForward.RandomHeadDim128:CudaForward.GraphsFollowTheCacheSlots' || exit 1; done
	cmake --build $(EMU_BUILD) --target dimoo -j $(JOBS)
	DIMOO_LIBRARY=$(CURDIR)/$(EMU_BUILD)/lib/libdimoo.so $(GO) test -count=1 -run 'CUDA' ./dimoo/

# The device benchmark (bench/cuda) at toy sizes on an emulated sm_90: every
# code path and correctness check it will run on the GPU, no meaningful times.
bench-emu:
	cmake -S . -B $(EMU_BUILD) -G Ninja -DDIMOO_CUDA=OFF -DDIMOO_CUDA_EMU=ON $(CMAKE_ARGS) >/dev/null
	cmake --build $(EMU_BUILD) --target dimoo_bench_cuda -j $(JOBS)
	DIMOO_EMU_SM=90 ./$(EMU_BUILD)/dimoo_bench_cuda --tiny

# The emulated CUDA tests under AddressSanitizer: a kernel reading or writing outside a
# device allocation or a shared array stops the run (about 5 min to build,
# 5 min to run on 2 cores; not part of CI).
ASAN_BUILD ?= build-emu-asan
test-emu-asan:
	cmake -S . -B $(ASAN_BUILD) -G Ninja -DDIMOO_CUDA=OFF -DDIMOO_CUDA_EMU=ON -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DCMAKE_CXX_FLAGS="-fsanitize=address -fno-omit-frame-pointer" -DCMAKE_EXE_LINKER_FLAGS=-fsanitize=address \
	  -DCMAKE_SHARED_LINKER_FLAGS=-fsanitize=address $(CMAKE_ARGS) >/dev/null
	cmake --build $(ASAN_BUILD) --target dimoo_tests -j $(JOBS)
	./$(ASAN_BUILD)/dimoo_tests --gtest_brief=1 --gtest_filter='$(EMU_TESTS)'
	DIMOO_EMU_SM=90 ./$(ASAN_BUILD)/dimoo_tests --gtest_brief=1 --gtest_filter='CudaKernels.AttentionSm90*'

# The CPU backend's C++ tests, then the Go packages that drive the library
# hardest (every C-boundary error path, concurrent pipelines, the server), on
# a library built with AddressSanitizer and UndefinedBehaviorSanitizer (about
# 5 min to build, 3 to run on 2 cores; not part of CI). Its libdimoo.so stays
# in the build folder; the Go test binaries run with the sanitizer runtimes
# preloaded (handle_segv=0: the Go runtime owns SIGSEGV).
SAN_BUILD ?= build-san
SAN_FLAGS = -fsanitize=address,undefined -fno-sanitize-recover=undefined
test-san:
	cmake -S . -B $(SAN_BUILD) -G Ninja -DDIMOO_CUDA=OFF -DCMAKE_BUILD_TYPE=RelWithDebInfo \
	  -DDIMOO_LIB_DIR=$(abspath $(SAN_BUILD))/lib -DCMAKE_CXX_FLAGS="$(SAN_FLAGS) -fno-omit-frame-pointer" \
	  -DCMAKE_EXE_LINKER_FLAGS="$(SAN_FLAGS)" -DCMAKE_SHARED_LINKER_FLAGS="$(SAN_FLAGS)" $(CMAKE_ARGS) >/dev/null
	cmake --build $(SAN_BUILD) -j $(JOBS)
	ctest --test-dir $(SAN_BUILD) --output-on-failure -j $(JOBS)
	DIMOO_LIBRARY=$(abspath $(SAN_BUILD))/lib/libdimoo.so DIMOO_REQUIRE_LIBRARY=1 $(GO) test -count=1 \
	  -exec "env LD_PRELOAD=$$($(CXX) -print-file-name=libasan.so):$$($(CXX) -print-file-name=libubsan.so) \
	  ASAN_OPTIONS=detect_leaks=0:handle_segv=0:allow_user_segv_handler=1" ./dimoo ./serve

bench: all
	$(GO) test -run '^$$' -bench . ./bench/

# Runs each fuzzer for FUZZTIME (their seed corpora run in `make test`): the
# loaders of every file a checkpoint folder or a user hands dimoo.
FUZZTIME  ?= 60s
FUZZ_LIB  := FuzzParseSafetensorsHeader FuzzParseConfig FuzzParseTokenizer FuzzParseVQConfig \
             FuzzSpecialTokens FuzzDefaults FuzzParseNpy FuzzLoadImage FuzzTokenizerRoundTrip
FUZZ_CLI  := FuzzReadCodes
fuzz:
	for f in $(FUZZ_LIB); do $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) ./dimoo || exit 1; done
	for f in $(FUZZ_CLI); do $(GO) test -run '^$$' -fuzz "^$$f$$" -fuzztime $(FUZZTIME) ./cmd/dimoo || exit 1; done

# Regenerates the golden test data with PyTorch (see scripts/requirements.txt).
testdata:
	bash scripts/gen_testdata.sh

clean:
	rm -rf $(BUILD) $(EMU_BUILD) $(ASAN_BUILD) lib bin
