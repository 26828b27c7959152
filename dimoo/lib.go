package dimoo

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// ABIVersion is the DIMOO_ABI_VERSION this package was written against.
const ABIVersion = 5

// EnvLibrary names the environment variable that points at libdimoo.
const EnvLibrary = "DIMOO_LIBRARY"

// Library is a loaded libdimoo: the file, how it was found, and its C
// functions bound with purego. Calls cross the boundary once per forward, not
// per op: purego costs about as much as cgo, a few hundred nanoseconds a call.
type Library struct {
	Path   string // the file that was loaded
	Source string // how it was found: "option", "$DIMOO_LIBRARY", "executable", "source tree"

	handle uintptr
	native nativeThread // where OpenMP-computing calls run

	// const char *dimoo_version(void) and friends: see include/dimoo.h for
	// each prototype; the Go signatures mirror them one to one.
	abiVersion    func() int32
	version       func() string
	statusString  func(int32) string
	backendBuilt  func(int32) int32
	deviceCount   func(int32) int32
	structSize    func(string) int64
	structOffset  func(string, string) int64
	runtimeCreate func(backend, device, nThreads int32, out *uintptr, err *byte, errLen uintptr) int32
	runtimeFree   func(uintptr)
	runtimeError  func(uintptr) string
	runtimeDesc   func(uintptr, *byte, uintptr) int32
	modelCreate   func(rt uintptr, cfg *cModelConfig, out *uintptr, err *byte, errLen uintptr) int32
	modelFree     func(uintptr)
	modelError    func(uintptr) string
	modelSetW     func(m uintptr, name string, dtype int32, shape *int64, ndim int32, data unsafe.Pointer, nbytes uint64) int32
	modelFinalize func(uintptr) int32
	modelWBytes   func(uintptr) int64
	ctxCreate     func(m uintptr, p *cCtxParams, out *uintptr, err *byte, errLen uintptr) int32
	ctxFree       func(uintptr)
	ctxError      func(uintptr) string
	ctxCancel     func(uintptr)
	ctxBytes      func(uintptr) int64
	forward       func(c uintptr, args *cForwardArgs, n int32) int32
	sampleImage   func(rt uintptr, args *cSampleArgs) int32
	imageStep     func(c uintptr, args *cImageStepArgs) int32
	textStep      func(c uintptr, args *cTextStepArgs) int32
	tokenMask     func(c uintptr, allowed *uint8, n int32) int32
	cacheSelect   func(c uintptr, seq, nTokens int32, q float64, out *int32, nOut *int32) int32
	estimate      func(backend, nThreads int32, cfg *cModelConfig, dtype int32, p *cCtxParams, model, ctx *int64,
		err *byte, errLen uintptr) int32

	// VQ-VAE (dimoo_vq_*).
	vqCreate       func(rt uintptr, cfg *cVQConfig, out *uintptr, err *byte, errLen uintptr) int32
	vqFree         func(uintptr)
	vqError        func(uintptr) string
	vqSetW         func(vq uintptr, name string, dtype int32, shape *int64, ndim int32, data unsafe.Pointer, nbytes uint64) int32
	vqFinalize     func(uintptr) int32
	vqWBytes       func(uintptr) int64
	vqCancel       func(uintptr)
	vqDecode       func(vq uintptr, codes *int32, h, w int32, out *float32) int32
	vqDecodeLatent func(vq uintptr, latent *float32, h, w int32, out *float32) int32
	vqEncode       func(vq uintptr, pixels *float32, h, w int32, codes *int32) int32
	vqEncodeLatent func(vq uintptr, pixels *float32, h, w int32, latent *float32) int32
}

// LibraryOptions chooses which libdimoo to load.
type LibraryOptions struct {
	// Path, when set, is the only file tried.
	Path string
}

var (
	defaultOnce sync.Once
	defaultLib  *Library
	defaultErr  error
)

// DefaultLibrary loads libdimoo once per process, searching in order:
// $DIMOO_LIBRARY, next to the executable (and ../lib from it), then lib/ of
// the source tree this package was built from.
func DefaultLibrary() (*Library, error) {
	defaultOnce.Do(func() { defaultLib, defaultErr = OpenLibrary(LibraryOptions{}) })
	return defaultLib, defaultErr
}

func libName() string {
	if runtime.GOOS == "darwin" {
		return "libdimoo.dylib"
	}
	return "libdimoo.so"
}

type candidate struct{ path, source string }

func candidates(opts LibraryOptions) []candidate {
	if opts.Path != "" {
		return []candidate{{opts.Path, "option"}}
	}
	var c []candidate
	if p := os.Getenv(EnvLibrary); p != "" {
		// An explicit variable is a promise: don't silently fall back.
		return []candidate{{p, "$" + EnvLibrary}}
	}
	if exe, err := os.Executable(); err == nil {
		dir := filepath.Dir(exe)
		c = append(c, candidate{filepath.Join(dir, libName()), "executable"},
			candidate{filepath.Join(dir, "..", "lib", libName()), "executable"})
	}
	if _, file, _, ok := runtime.Caller(0); ok {
		c = append(c, candidate{filepath.Join(filepath.Dir(file), "..", "lib", libName()), "source tree"})
	}
	return c
}

// OpenLibrary loads libdimoo and checks its ABI version and struct layouts.
func OpenLibrary(opts LibraryOptions) (*Library, error) {
	var tried []string
	for _, c := range candidates(opts) {
		if _, err := os.Stat(c.path); err != nil {
			tried = append(tried, fmt.Sprintf("%s (%s): not found", c.path, c.source))
			continue
		}
		lib, err := openAt(c.path)
		if err != nil {
			return nil, err
		}
		lib.Source = c.source
		return lib, nil
	}
	return nil, fmt.Errorf("%w: could not find %s; build it with `make` or set %s. Tried: %v",
		ErrLibrary, libName(), EnvLibrary, tried)
}

func openAt(path string) (lib *Library, err error) {
	abs, aerr := filepath.Abs(path)
	if aerr == nil {
		path = abs
	}
	h, derr := purego.Dlopen(path, purego.RTLD_NOW|purego.RTLD_LOCAL)
	if derr != nil {
		return nil, fmt.Errorf("%w: could not load %q: %v", ErrLibrary, path, derr)
	}
	lib = &Library{Path: path, handle: h}
	// RegisterLibFunc panics on a missing symbol; report it as an error.
	defer func() {
		if r := recover(); r != nil {
			purego.Dlclose(h)
			lib, err = nil, fmt.Errorf("%w: %q is not a compatible libdimoo: %v", ErrLibrary, path, r)
		}
	}()
	reg := func(fptr any, name string) { purego.RegisterLibFunc(fptr, h, name) }
	reg(&lib.abiVersion, "dimoo_abi_version")
	if v := lib.abiVersion(); v != ABIVersion {
		purego.Dlclose(h)
		return nil, fmt.Errorf("%w: %q has ABI version %d, this package needs %d", ErrLibrary, path, v, ABIVersion)
	}
	reg(&lib.version, "dimoo_version")
	reg(&lib.statusString, "dimoo_status_string")
	reg(&lib.backendBuilt, "dimoo_backend_built")
	reg(&lib.deviceCount, "dimoo_device_count")
	reg(&lib.structSize, "dimoo_struct_size")
	reg(&lib.structOffset, "dimoo_struct_offset")
	reg(&lib.runtimeCreate, "dimoo_runtime_create")
	reg(&lib.runtimeFree, "dimoo_runtime_destroy")
	reg(&lib.runtimeError, "dimoo_runtime_error")
	reg(&lib.runtimeDesc, "dimoo_runtime_describe")
	reg(&lib.modelCreate, "dimoo_model_create")
	reg(&lib.modelFree, "dimoo_model_destroy")
	reg(&lib.modelError, "dimoo_model_error")
	reg(&lib.modelSetW, "dimoo_model_set_weight")
	reg(&lib.modelFinalize, "dimoo_model_finalize")
	reg(&lib.modelWBytes, "dimoo_model_weight_bytes")
	reg(&lib.ctxCreate, "dimoo_ctx_create")
	reg(&lib.ctxFree, "dimoo_ctx_destroy")
	reg(&lib.ctxError, "dimoo_ctx_error")
	reg(&lib.ctxCancel, "dimoo_ctx_cancel")
	reg(&lib.ctxBytes, "dimoo_ctx_bytes")
	reg(&lib.forward, "dimoo_forward")
	reg(&lib.sampleImage, "dimoo_sample_image")
	reg(&lib.imageStep, "dimoo_image_step")
	reg(&lib.textStep, "dimoo_text_step")
	reg(&lib.tokenMask, "dimoo_ctx_set_token_mask")
	reg(&lib.cacheSelect, "dimoo_cache_select")
	reg(&lib.estimate, "dimoo_estimate")
	reg(&lib.vqCreate, "dimoo_vq_create")
	reg(&lib.vqFree, "dimoo_vq_destroy")
	reg(&lib.vqError, "dimoo_vq_error")
	reg(&lib.vqSetW, "dimoo_vq_set_weight")
	reg(&lib.vqFinalize, "dimoo_vq_finalize")
	reg(&lib.vqWBytes, "dimoo_vq_weight_bytes")
	reg(&lib.vqCancel, "dimoo_vq_cancel")
	reg(&lib.vqDecode, "dimoo_vq_decode")
	reg(&lib.vqDecodeLatent, "dimoo_vq_decode_latent")
	reg(&lib.vqEncode, "dimoo_vq_encode")
	reg(&lib.vqEncodeLatent, "dimoo_vq_encode_latent")
	if err := lib.CheckLayouts(); err != nil {
		purego.Dlclose(h)
		return nil, err
	}
	return lib, nil
}

// Version is the library's version string, naming the backends built in.
func (l *Library) Version() string { return l.version() }

// BackendBuilt reports whether the backend was compiled into the library.
func (l *Library) BackendBuilt(b Backend) bool { return l.backendBuilt(int32(b)) == 1 }

// DeviceCount is the number of devices the backend can use now (0 for CUDA
// without a GPU).
func (l *Library) DeviceCount(b Backend) int { return int(l.deviceCount(int32(b))) }

// statusError turns a non-zero status into an *Error with the message read
// from the handle (msg is called only on failure).
func statusError(st int32, op string, msg func() string) error {
	if st == 0 {
		return nil
	}
	return &Error{Status: Status(st), Op: op, Msg: msg()}
}

// errBuf is the caller buffer creation functions write their message into.
type errBuf [512]byte

func (b *errBuf) ptr() *byte     { return &b[0] }
func (b *errBuf) len() uintptr   { return uintptr(len(b)) }
func (b *errBuf) String() string { return cString(b[:]) }

// cString reads a NUL-terminated string the library wrote into buf.
func cString(buf []byte) string {
	for i, c := range buf {
		if c == 0 {
			return string(buf[:i])
		}
	}
	return string(buf)
}

var errClosed = errors.New("dimoo: use of a closed handle")

// ABIVersion calls dimoo_abi_version: the cheapest crossing of the C
// boundary, which the benchmarks use to price one purego call.
func (l *Library) ABIVersion() int32 { return l.abiVersion() }
