// PNG reading/writing (libpng) and the preprocessing of lsr.images.load_image, for the C++
// runtime: float32 (C, H, W) in [0, 1]; 1 channel = ITU-R 601 luma of colour images,
// 3 channels = RGB with grey replicated; alpha dropped; 8-bit / 255, 16-bit / 65535;
// resize = Pillow's BILINEAR on float images (antialiased when shrinking), clipped.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace lsr::image {

struct Float {
  int channels = 0, height = 0, width = 0;
  std::vector<float> data;  // (channels, height, width)
};

// The largest image read, in pixels (width x height): Pillow's default Image.MAX_IMAGE_PIXELS
// (1024 * 1024 * 1024 // 4 // 3), the limit of lsr's Python path (lsr.images). Checked from the
// header, before anything is allocated or decoded: a small PNG of 20000 x 20000 pixels is
// refused, not decoded into gigabytes.
constexpr uint64_t kMaxImagePixels = 89478485;

// Reads a PNG as float (H, W) planes: 1 channel for grey (+alpha), 3 for colour.
// Throws std::runtime_error("<path>: ...") on a missing, truncated, non-PNG or too large
// (kMaxImagePixels) file.
Float read_png(const std::string& path);

// (height, width) from the PNG header alone; throws as read_png (missing, not a PNG, too large).
std::pair<int, int> png_size(const std::string& path);

// (height, width) after decoding the whole file with the memory of one row (the pixels are
// dropped); throws as read_png, so a file cut short is found too. For checking every input
// before anything is written.
std::pair<int, int> verify_png(const std::string& path);

// To the model's channels (1 or 3), as lsr.images.load_image does.
Float to_channels(const Float& img, int channels);

// Pillow's Image.resize(BILINEAR) on float ("F") planes, then clipped to [0, 1].
Float resize_bilinear(const Float& img, int height, int width);

// Writes an 8-bit grey PNG from (height, width) values in [0, 255], atomically (PATH.tmp, renamed).
void write_png_gray8(const std::string& path, const std::vector<uint8_t>& pixels, int height, int width);

}  // namespace lsr::image
