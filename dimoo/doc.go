// Package dimoo runs Lumina-DiMOO, an 8B masked-diffusion model over text
// tokens and VQ image codes, through libdimoo (C++/CUDA, loaded at run time
// with purego: no cgo).
//
// Most callers want a Pipeline: OpenPipeline loads a checkpoint folder in
// the Hugging Face layout (config.json, safetensors shards, tokenizer.json,
// vqvae/) and serves the tasks, each with a context (cancelled between
// steps, and between layers inside a forward), a request struct whose zero
// fields take the model's defaults, and an optional progress callback:
//
//   - GenerateImage: text to image, with classifier-free guidance and
//     optionally ML-Cache (ImageSampling.UseCache);
//   - EditImage: editing, control, subject-driven, style transfer and dense
//     prediction (EditRequest.EditType, see EditTypes);
//   - Inpaint and InpaintMask: regenerate a centred rectangle of an image,
//     everything around it (outpainting), or the region a mask marks;
//   - Understand: answer a question about an image, optionally streamed.
//
// A Pipeline is safe for concurrent use; a Batcher (Pipeline.NewBatcher)
// lets concurrent requests share each step's forward. Below it, LoadModel
// and Model.NewSession give one library call per forward (Session.Forward,
// with ML-Cache's STORE and USE modes) and per decode (Session.DecodeImage);
// LoadTokenizer and LoadVQModel stand alone.
//
// The library is found from LoadOptions.Library, else $DIMOO_LIBRARY, else
// next to the executable, else lib/ of the source tree (DefaultLibrary).
// Errors wrap one of the sentinels (ErrBadCheckpoint, ErrInvalidArgument,
// ErrOutOfMemory, ErrUnsupported, ErrCancelled, ErrLibrary) for errors.Is.
package dimoo
