// PNG reading/writing (libpng) and the preprocessing of lsr.data.load_image, for the C++
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

// Reads a PNG as float (H, W) planes: 1 channel for grey (+alpha), 3 for colour.
// Throws std::runtime_error("<path>: ...") on a missing, truncated or non-PNG file.
Float read_png(const std::string& path);

// (height, width) from the PNG header alone; throws as read_png. For checking every input
// before any work is done.
std::pair<int, int> png_size(const std::string& path);

// To the model's channels (1 or 3), as lsr.data.load_image does.
Float to_channels(const Float& img, int channels);

// Pillow's Image.resize(BILINEAR) on float ("F") planes, then clipped to [0, 1].
Float resize_bilinear(const Float& img, int height, int width);

// Writes an 8-bit grey PNG from (height, width) values in [0, 255], atomically (PATH.tmp, renamed).
void write_png_gray8(const std::string& path, const std::vector<uint8_t>& pixels, int height, int width);

}  // namespace lsr::image
